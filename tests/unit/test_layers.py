"""The rooms of the code base stay what the README's Layout section says they are.

- ``nicpassd/engine/`` imports in one direction: no module of it imports (directly or through
  other engine modules) one that imports it back;
- only ``nicpassd/host/`` and ``nicpassd/sim/`` touch the kernel: no other module of the package
  names a sysfs or procfs path, asks ``HostPaths`` for a kernel view, reads a link (a driver, a
  PF) or opens a pidfd. ``nicpassd/paths.py`` defines the paths under the injectable root (and
  opens none); plain file calls elsewhere are nicpassd's own files (state, leases, config).

Read from the source (ast), so a change that breaks either fails here with the module and line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support import REPO

PACKAGE = REPO / "nicpassd"
KERNEL_ROOMS = ("host", "sim")
# HostPaths properties and methods that are views of the kernel (the rest are nicpassd's own files).
KERNEL_PATHS = {"sys", "pci_devices", "pci_drivers", "drivers_probe", "class_net", "class_iommu", "iommu_groups",
                "proc_net", "proc_cmdline", "dev_vfio", "udev_control", "udev_data", "pci_device"}
KERNEL_CALLS = {("os", "readlink"), ("os", "pidfd_open")}
WHERE_PATHS_ARE_DEFINED = "nicpassd.paths"
KERNEL_TEXT = re.compile(r"(^|/)(sys|proc)/|/sys$|/proc$")


def modules(directory: Path) -> dict[str, Path]:
    return {".".join(path.relative_to(REPO).with_suffix("").parts): path for path in sorted(directory.rglob("*.py"))
            if path.name != "__init__.py"}


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_engine_imports_in_one_direction():
    engine = modules(PACKAGE / "engine")
    graph = {name: {other for other in imported_names(path) if other in engine and other != name}
             for name, path in engine.items()}
    assert len(graph) >= 10  # the test reads the real tree
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def kernel_touches(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr in KERNEL_PATHS and isinstance(node.ctx, ast.Load):
            found.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and (func.value.id, func.attr) in KERNEL_CALLS:
                found.append(f"{where}: {func.value.id}.{func.attr}()")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and KERNEL_TEXT.search(node.value) \
                and "\n" not in node.value and " " not in node.value:
            found.append(f"{where}: {node.value!r}")
    return found


def test_only_the_host_and_the_simulator_touch_the_kernel():
    outside = {name: path for name, path in modules(PACKAGE).items()
               if name.split(".")[1] not in KERNEL_ROOMS and name != WHERE_PATHS_ARE_DEFINED}
    assert "nicpassd.engine.operations" in outside and "nicpassd.daemon" in outside
    touches = [touch for path in outside.values() for touch in kernel_touches(path)]
    assert touches == []


def test_the_kernel_check_sees_a_kernel_touch(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('import os\nx = os.readlink(f"{root}/driver")\ny = paths.pci_devices\nz = "/proc/self/stat"\n')
    sample = sample.rename(REPO / "tests" / "unit" / f".layers-sample-{tmp_path.name}.py")
    try:
        assert [touch.split(": ", 1)[1] for touch in kernel_touches(sample)] == [
            "os.readlink()", ".pci_devices", "'/proc/self/stat'"]
    finally:
        sample.unlink()
