"""packaging/install, run into a temporary root (--root) as an admin would run it into /."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "packaging" / "install"
SYSTEM_PYTHON = Path("/usr/bin/python3")  # Debian's: venv, pip, setuptools (scripts/setup)

EXPECTED = {
    "usr/lib/systemd/system/nicpassd.service": REPO / "systemd/nicpassd.service",
    "usr/share/dbus-1/system.d/org.nicpass.NicPass1.conf": REPO / "dbus/org.nicpass.NicPass1.conf",
    "usr/share/polkit-1/actions/org.nicpass.NicPass1.policy": REPO / "packaging/polkit/org.nicpass.NicPass1.policy",
    "usr/lib/udev/rules.d/90-nicpassd.rules": REPO / "packaging/udev/90-nicpassd.rules",
    "etc/libvirt/hooks/qemu.d/50-nicpassd": REPO / "client/hooks/libvirt-qemu",
    "usr/lib/nicpassd/nicpassd-hook-helper": REPO / "client/hooks/nicpassd-hook-helper",
    "usr/lib/nicpassd/nicpassd_hook.py": REPO / "client/hooks/nicpassd_hook.py",
    "usr/lib/nicpassd/nicpassd_domain_xml.py": REPO / "client/hooks/nicpassd_domain_xml.py",
    "usr/lib/nicpassd/nicpassd-pve-hook": REPO / "client/hooks/nicpassd-pve-hook",
    "etc/nicpassd/nicpassd.toml": REPO / "packaging/nicpassd.toml",
}
EXECUTABLE = ("etc/libvirt/hooks/qemu.d/50-nicpassd", "usr/lib/nicpassd/nicpassd-hook-helper",
              "usr/lib/nicpassd/nicpassd-pve-hook", "usr/libexec/nicpassd/nicpassd-udev-override")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """nicpassd's wheel, built offline from a copy of the checkout (as the e2e suite does)."""
    for module in ("venv", "pip", "setuptools", "wheel"):
        assert subprocess.run([SYSTEM_PYTHON, "-c", f"import {module}"]).returncode == 0, (
            f"{SYSTEM_PYTHON} has no {module}: run scripts/setup")
    work = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, work)
    for name in ("nicpassd", "client"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([SYSTEM_PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-w", str(out), str(work)], check=True, capture_output=True)
    return out


def install(root: Path, wheels: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DESTDIR")}
    result = subprocess.run(["bash", str(INSTALLER), "--root", str(root), "--wheels", str(wheels), "--no-deps", *extra],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_installer_lays_out_every_file_and_uninstalls_them(tmp_path, wheels):
    root = tmp_path / "root"
    first = install(root, wheels)
    for relative, source in EXPECTED.items():
        assert (root / relative).read_bytes() == source.read_bytes(), relative
        assert f"installed: /{relative}" in first.stdout
    for relative in EXECUTABLE:
        assert os.access(root / relative, os.X_OK), relative
    # the entry points, where the unit (ExecStart=/usr/bin/nicpassd) and PATH expect them
    for tool in ("nicpassd", "nicpassctl"):
        assert os.readlink(root / "usr/bin" / tool) == f"/usr/lib/nicpassd/venv/bin/{tool}"
        script = (root / "usr/lib/nicpassd/venv/bin" / tool).read_text()
        assert script.startswith("#!/usr/lib/nicpassd/venv/bin/python"), script.splitlines()[0]
    assert "\nExecStart=/usr/bin/nicpassd\n" in (root / "usr/lib/systemd/system/nicpassd.service").read_text()
    # the daemon's command starts Python without its site step, and finds the package on its own
    daemon_command = root / "usr/lib/nicpassd/venv/bin/nicpassd"
    assert daemon_command.read_text().splitlines()[0] == "#!/usr/lib/nicpassd/venv/bin/python3 -S"
    # (its main block left out: the daemon's stack is not in this --no-deps venv)
    found_main = "import runpy, sys; print(runpy.run_path(sys.argv[1], run_name='check')['main'].__code__.co_filename)"
    ran = subprocess.run([root / "usr/lib/nicpassd/venv/bin/python3", "-S", "-c", found_main, daemon_command],
                         capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert ran.returncode == 0, ran.stderr
    [package] = (root / "usr/lib/nicpassd/venv/lib").glob("python3*/site-packages/nicpassd")
    assert ran.stdout.strip() == str(package / "start.py")
    # the udev helper imports nicpassd: it runs the venv's Python, isolated
    helper = (root / "usr/libexec/nicpassd/nicpassd-udev-override").read_text()
    assert helper.splitlines()[0] == "#!/usr/lib/nicpassd/venv/bin/python3 -I"
    assert helper.splitlines()[1:] == (REPO / "packaging/udev/nicpassd-udev-override").read_text().splitlines()[1:]
    # the venv holds this checkout's package and sees the system's packages
    venv_python = root / "usr/lib/nicpassd/venv/bin/python3"
    found = subprocess.run([venv_python, "-I", "-c", "import nicpassd.host.early_binding, sys; print(nicpassd.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert found.returncode == 0 and "/usr/lib/nicpassd/venv/lib/" in found.stdout, found.stderr
    assert "include-system-site-packages = true" in (root / "usr/lib/nicpassd/venv/pyvenv.cfg").read_text()
    assert list((root / "usr/lib/nicpassd/__pycache__").glob("nicpassd_hook.*.pyc"))
    assert not (root / "usr/lib/nicpassd/nicpassd_domain_xml.py").is_symlink()
    # the installed helper finds the domain reading beside it (a domain without PCI devices: exit 0)
    ran = subprocess.run([SYSTEM_PYTHON, "-S", "-I", root / "usr/lib/nicpassd/nicpassd-hook-helper", "libvirt-prepare",
                          "g"], input=b"<domain><name>g</name><devices><disk/></devices></domain>",
                         capture_output=True, timeout=30)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, b"", b"")

    # idempotent, and an admin's config is never overwritten
    manifest = (root / "usr/lib/nicpassd/installed-files").read_text()
    assert "/usr/bin/nicpassd\n" in manifest and "/usr/lib/systemd/system/nicpassd.service\n" in manifest
    (root / "etc/nicpassd/nicpassd.toml").write_text("# mine\n")
    again = install(root, wheels)
    assert "kept: /etc/nicpassd/nicpassd.toml" in again.stdout
    assert (root / "etc/nicpassd/nicpassd.toml").read_text() == "# mine\n"
    assert (root / "usr/lib/nicpassd/installed-files").read_text() == manifest

    result = subprocess.run(["bash", str(INSTALLER), "--root", str(root), "--uninstall"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())
    assert left == ["etc/nicpassd/nicpassd.toml"], left
