"""Every file nicpassd reads × every way it can be bad: the documented outcome each time (issue 19).

Files and what a bad one gets:

- ``nicpassd.toml`` (config) and ``state.json`` (desired state): refused, the error names the file
  (the daemon exits 78, tests/integration/test_daemon_process.py), the file is never changed;
- ``guard.json`` (the guard's memory): kept aside, said at crit, the live management path still
  protected;
- ``leases.json``, ``journal.json``, ``runtime.json`` (runtime records): kept aside and never
  overwritten, said at crit, and every device the bad file still names is left alone: leased to
  the unknown VM, a journal suspect, or held — no reconcile writes to it.

Damages: truncated, not UTF-8, a value of the wrong type, a value out of range (or a name outside
its grammar), a directory in the file's place.
"""

from __future__ import annotations

import logging

import pytest

from nicpassd.engine.config import ConfigError, load_config
from nicpassd.engine.journal import DeviceBefore
from nicpassd.engine.leases import UNKNOWN_VM
from nicpassd.engine.store import StateStore, StateStoreError
from nicpassd.host.kernelio import PCI_ADDRESS

PF = "0000:3b:00.0"
VFS = [f"0000:3b:02.{n}" for n in range(4)]
VM = "00000000-0000-4000-8000-00000000000a"
DAMAGES = ("truncated", "not UTF-8", "wrong type", "out of range", "directory")

# Per file: (text to find, its replacement) for the wrong-type and out-of-range damages.
EDITS = {
    "state.json": {"wrong type": ('"num_vfs": 4', '"num_vfs": "four"'),
                   "out of range": ('"num_vfs": 4', '"num_vfs": -5')},
    "guard.json": {"wrong type": ('"reasons": [', '"reasons": "text", "x": ['),
                   "out of range": ('"driver": "igb"', '"driver": "../../evil"')},
    "leases.json": {"wrong type": ('"expires": ', '"expires": "soon", "x": '),
                    "out of range": ('"pid": 0', '"pid": -5')},
    "journal.json": {"wrong type": ('"started": ', '"started": "soon", "x": '),
                     "out of range": (f'"{VFS[3]}": {{', f'"{VFS[3]}/../x": {{')},
    "runtime.json": {"wrong type": (f'"{VFS[1]}": "runtime"', f'"{VFS[1]}": 7'),
                     "out of range": (f'"{VFS[1]}": ', f'"{VFS[1]}/../x": ')},
}


def damage(path, how: str) -> bytes | None:
    """Damage the file; returns its new bytes (None for a directory in its place)."""
    good = path.read_bytes()
    if how == "directory":
        path.unlink()
        path.mkdir()
        (path / "x").write_text("a directory where a file belongs")
        return None
    if how == "truncated":
        bad = good[: len(good) // 2]
    elif how == "not UTF-8":
        bad = b"\xff\xfe" + good
    else:
        old, new = EDITS[path.name][how]
        assert old in good.decode(), (path.name, old)
        bad = good.decode().replace(old, new, 1).encode()
    path.write_bytes(bad)
    return bad


async def every_file_written(sim) -> None:
    """A host with something in every file: persisted VFs and a binding, a runtime hold, a lease,
    a journal entry of a bind cut short, and the guard's memory of the management path."""
    await sim.engine.set_vf_count(PF, 4)
    await sim.engine.bind(VFS[0], "vfio-pci")
    await sim.engine.bind(VFS[1], "vfio-pci", persist=False)
    await sim.engine.prepare("vm1", VM, [VFS[2]])
    sim.engine.journal.begin("bind", {VFS[3]: DeviceBefore(sim.engine.host.present(VFS[3]))},
                             target={"driver": "vfio-pci"})
    await sim.engine.view.memory.flush()
    for name in ("state.json", "guard.json"):
        assert (sim.paths.state_dir / name).is_file(), name
    for name in ("leases.json", "journal.json", "runtime.json"):
        assert (sim.paths.runtime_dir / name).is_file(), name
    sim.writer.clear()


def kept_aside(directory, name: str, bad: bytes | None) -> None:
    kept = [p for p in directory.iterdir() if p.name.startswith(f"{name}.broken-")]
    assert len(kept) == 1, (name, sorted(p.name for p in directory.iterdir()))
    if bad is None:
        assert kept[0].is_dir()
    else:
        assert kept[0].read_bytes() == bad  # kept as it was, never rewritten


@pytest.mark.parametrize("how", DAMAGES)
async def test_a_bad_state_file_is_refused_and_left_as_it_is(sim, how):
    await every_file_written(sim)
    path = sim.paths.state_dir / "state.json"
    bad = damage(path, how)
    with pytest.raises(StateStoreError, match="state.json"):
        StateStore(sim.paths.state_dir)
    assert path.is_dir() if bad is None else path.read_bytes() == bad
    assert not [p for p in sim.paths.state_dir.iterdir() if "broken" in p.name]


CONFIG = "[daemon]\nwrite_timeout = 5\n[guard]\nheal = true\n"
CONFIG_EDITS = {"wrong type": ("write_timeout = 5", 'write_timeout = "soon"'),
                "out of range": ("write_timeout = 5", "write_timeout = 1e308")}


@pytest.mark.parametrize("how", DAMAGES)
def test_a_bad_config_is_refused_and_left_as_it_is(tmp_path, how):
    path = tmp_path / "nicpassd.toml"
    path.write_text(CONFIG)
    if how in CONFIG_EDITS:
        old, new = CONFIG_EDITS[how]
        path.write_text(CONFIG.replace(old, new))
        bad = path.read_bytes()
    else:
        bad = damage(path, how)
    with pytest.raises(ConfigError, match="nicpassd.toml"):
        load_config(path)
    assert path.is_dir() if bad is None else path.read_bytes() == bad


@pytest.mark.parametrize("how", DAMAGES)
async def test_a_bad_guard_memory_is_kept_aside_and_the_live_path_still_protected(sim, how, caplog):
    await every_file_written(sim)
    path = sim.paths.state_dir / "guard.json"
    bad = damage(path, how)
    with caplog.at_level(logging.CRITICAL):
        engine = sim.restart()
    kept_aside(sim.paths.state_dir, "guard.json", bad)
    assert any("guard.json" in r.getMessage() and r.levelno == logging.CRITICAL for r in caplog.records)
    # What the kernel shows still protects, and is remembered anew.
    assert "0000:01:00.0" in engine.protected.entries and "0000:01:00.0" in engine.view.memory.entries


def named(bad: bytes | None) -> set[str]:
    return set(PCI_ADDRESS.findall(bad.decode(errors="replace"))) if bad else set()


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["leases.json", "journal.json", "runtime.json"])
async def test_a_bad_runtime_record_is_kept_aside_and_what_it_names_left_alone(sim, name, how, caplog):
    await every_file_written(sim)
    path = sim.paths.runtime_dir / name
    bad = damage(path, how)
    before = {address: (sim.driver(address), sim.override(address)) for address in [PF, *VFS]}
    with caplog.at_level(logging.CRITICAL):
        engine = sim.restart()
    kept_aside(sim.paths.runtime_dir, name, bad)
    assert any(name in r.getMessage() and r.levelno == logging.CRITICAL for r in caplog.records), caplog.text
    suspects = named(bad)
    if name == "leases.json":
        assert {device for device, vm in engine.leases.holder().items() if vm == UNKNOWN_VM} == suspects
    elif name == "journal.json":
        assert set(engine.journal.suspects) == suspects and engine.journal.pending() == []
    else:
        assert set(engine.holds.holds) == suspects
    # Nothing the bad file names is touched: not by the boot reconcile, not by the healer.
    await engine.reconcile()
    touched = {parent for parent, _attr, _data in sim.writer.writes} | {
        data.strip() for _parent, attr, data in sim.writer.writes if attr in ("unbind", "bind", "drivers_probe")}
    assert not touched & suspects, (suspects, sim.writer.writes)
    assert {a: (sim.driver(a), sim.override(a)) for a in suspects} == {a: before[a] for a in suspects}
