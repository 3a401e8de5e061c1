"""The persisted VFs created first thing at the daemon's start (nicpassd/host/early_vfs.py), from
the early-binding list's ``vf_counts`` that the reconciler keeps."""

from __future__ import annotations

import errno
import json

import pytest

from nicpassd.host import early_binding
from nicpassd.host.early_vfs import create_persisted_vfs

PF, PF2, ENO1 = "0000:3b:00.0", "0000:3b:00.1", "0000:01:00.0"


async def persisted(make_sim, count: int = 3, driver: str = "vfio-pci"):
    sim = make_sim()
    await sim.engine.set_vf_count(PF, count, driver=driver)
    await sim.engine.reconcile()  # writes the early-binding list
    return sim


@pytest.fixture
def reboot(sim_tools):
    """The tree rebuilt under the same root (what the kernel shows after a reboot; nicpassd's own
    files stay, /run/nicpassd too, as after a daemon restart)."""
    return lambda sim: sim_tools.build_kernel(sim.paths.root, sim.kernel.topology)


@pytest.fixture
def attach_engine(sim_tools):
    return sim_tools.attach_engine


async def test_the_list_carries_the_counts_of_pfs_whose_vfs_need_nothing_else(make_sim):
    sim = await persisted(make_sim)
    await sim.engine.set_vf_count(PF2, 2)
    await sim.engine.reconcile()
    counts = early_binding.read_list(sim.paths.root)["vf_counts"]
    assert counts[PF] == {"count": "3", "driver": "vfio-pci", "vendor": "8086", "device": "1572",
                          "subsystem_vendor": "8086", "subsystem_device": "0006",
                          "serial": "3c-fd-fe-ff-ff-a0-00-00"}
    assert counts[PF2]["count"] == "2" and counts[PF2]["driver"] == ""


async def test_vfs_with_settings_or_a_vf_of_their_own_are_left_to_the_engine(make_sim):
    sim = await persisted(make_sim)
    await sim.engine.set_vf_count(PF2, 2)
    await sim.engine.set_vf_settings(f"{PF}:1", {"mac": "02:00:00:00:00:01"})
    await sim.engine.bind(sim.vfs(PF2)[0], "vfio-pci")  # one VF of PF2 on vfio-pci, the other on iavf
    await sim.engine.reconcile()
    listing = early_binding.read_list(sim.paths.root)
    assert listing["vf_counts"] == {}
    assert PF in listing["vf_drivers"]  # the udev helper still puts the override on its VFs


async def test_after_a_reboot_the_vfs_are_on_vfio_pci_before_the_engine_and_it_has_nothing_to_do(
        make_sim, reboot, attach_engine):
    sim = await persisted(make_sim)
    after = reboot(sim)
    assert after.numvfs(PF) == 0 and after.autoprobe(PF) == "1"
    assert create_persisted_vfs(after.paths.root, after.writer) == [f"{PF}: 3 VFs created on vfio-pci"]
    vfs = after.vfs(PF)
    assert [after.driver(vf) for vf in vfs] == ["vfio-pci"] * 3 and after.autoprobe(PF) == "0"
    # the writes of a careful shell loop, no more: no VF ever on its host driver
    assert after.writer.calls == [("modprobe", "vfio-pci", ""), (PF, "sriov_drivers_autoprobe", "0"),
                                  (PF, "sriov_numvfs", "3"),
                                  *[(vf, "driver_override", "vfio-pci\n") for vf in vfs],
                                  *[("pci", "drivers_probe", vf) for vf in vfs]]
    assert not [e for e in after.events if e.action == "bind" and e.driver == "iavf"]
    engine = attach_engine(after).engine
    assert [outcome.row for outcome in await engine.reconcile()] == []
    assert after.writer.calls == []


async def test_vfs_for_their_host_driver_are_created_with_autoprobe_on(make_sim, reboot):
    sim = await persisted(make_sim, 2, driver="")
    after = reboot(sim)
    assert create_persisted_vfs(after.paths.root, after.writer) == [f"{PF}: 2 VFs created"]
    assert [after.driver(vf) for vf in after.vfs(PF)] == ["iavf", "iavf"]
    assert after.writer.calls == [(PF, "sriov_numvfs", "2")]


# ------------------------------------------------------------------ what is left to the daemon
def route_on(sim, interface: str) -> None:
    with open(sim.paths.proc_net / "route", "a") as routes:
        routes.write(f"{interface}\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")


def journal_entry(sim) -> None:
    path = sim.paths.runtime_dir / "journal.json"
    path.write_text(json.dumps({"version": 1, "entries": [{"operation": "set_vf_count", "devices": {}}]}))


def remembered(sim) -> None:
    path = sim.paths.state_dir / "guard.json"
    path.write_text(json.dumps({"version": 1, "entries": [{"address": PF, "reasons": ["default route"]}]}))


def held(sim) -> None:
    path = sim.paths.runtime_dir / "runtime.json"
    path.write_text(json.dumps({"version": 1, "holds": {PF: "SetVfCount"}}))


def other_card(sim) -> None:
    path = sim.paths.root / early_binding.LIST_FILE
    listing = json.loads(path.read_text())
    listing["vf_counts"][PF]["device"] = "1583"
    path.write_text(json.dumps(listing))


def unbound(sim) -> None:
    sim.kernel.write(sim.paths.pci_drivers / "i40e" / "unbind", PF)


def has_vfs(sim) -> None:
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "1")


def routed(sim) -> None:
    route_on(sim, sorted(path.name for path in (sim.dir(PF) / "net").iterdir())[0])


SKIPS = {
    "a crash left an operation in the undo journal": (journal_entry, "no VFs created early: the undo journal"),
    "the guard remembers the PF on the management path": (remembered, f"{PF}: left to the daemon's guard: it was on"),
    "a --runtime change holds the PF": (held, f"{PF}: left as it is: changed with --runtime"),
    "another card at the address": (other_card, f"{PF}: left to the daemon: identity changed (device is 1572"),
    "the PF has no driver yet": (unbound, f"{PF}: left to the daemon: its driver has not bound it yet"),
    "the PF has VFs": (has_vfs, f"{PF}: left to the daemon: it has 1 VFs"),
    "the PF's interface routes traffic": (routed, f"{PF}: left to the daemon's guard: "),
}


async def test_what_the_daemon_must_decide_is_left_to_it_untouched(make_sim, reboot):
    for why, (arrange, said) in SKIPS.items():
        sim = await persisted(make_sim)
        after = reboot(sim)
        arrange(after)
        after.writer.clear()
        lines = create_persisted_vfs(after.paths.root, after.writer)
        assert len(lines) == 1 and lines[0].startswith(said), (why, lines)
        assert after.writer.calls == [], why


async def test_a_bond_above_the_pf_that_routes_keeps_it_from_being_touched(make_sim, reboot):
    sim = await persisted(make_sim)
    after = reboot(sim)
    interface = sorted(p.name for p in (after.dir(PF) / "net").iterdir())[0]
    (after.paths.class_net / interface / "upper_bond0").symlink_to("../bond0")
    route_on(after, "bond0")
    assert create_persisted_vfs(after.paths.root, after.writer) == [
        f"{PF}: left to the daemon's guard: bond0, br0 carry routes"]
    # the link-local and multicast routes every interface that is up has do not count
    (after.paths.class_net / interface / "upper_bond0").unlink()
    (after.paths.proc_net / "route").write_text("Iface\tDestination\n")
    with open(after.paths.proc_net / "ipv6_route", "a") as routes:
        routes.write(f"fe800000000000000000000000000000 40 {'0' * 32} 00 {'0' * 32} 00000100 00000001 "
                     f"00000000 00000001 {interface}\n")
    assert create_persisted_vfs(after.paths.root, after.writer) == [f"{PF}: 3 VFs created on vfio-pci"]


async def test_a_bad_list_creates_nothing_and_says_so(make_sim, reboot):
    sim = await persisted(make_sim)
    after = reboot(sim)
    path = after.paths.root / early_binding.LIST_FILE
    listing = json.loads(path.read_text())
    listing["vf_counts"][PF]["count"] = "-3"
    path.write_text(json.dumps(listing))
    lines = create_persisted_vfs(after.paths.root, after.writer)
    assert lines == [f"no VFs created early: {path}: vf_counts.'{PF}'.count: '-3' is not a VF count above 0; "
                     "nicpassd rewrites it at its next reconcile (`nicpassctl reconcile`)"]
    assert after.writer.calls == []


# --------------------------------------------------------------------------- on a failure
async def test_a_refused_vf_count_is_undone_with_the_kernel_s_words(make_sim, reboot):
    sim = await persisted(make_sim)
    after = reboot(sim)
    after.kernel.faults.write_errors[(PF, "sriov_numvfs")] = (errno.ENOMEM, 1)
    assert create_persisted_vfs(after.paths.root, after.writer) == [
        f"{PF}: not created early (the kernel said: Cannot allocate memory: injected failure of sriov_numvfs); "
        "undone; the daemon tries again"]
    assert (after.numvfs(PF), after.autoprobe(PF)) == (0, "1")


async def test_a_vf_that_does_not_bind_undoes_them_all(make_sim, reboot, attach_engine):
    sim = await persisted(make_sim)
    vf = sim.vfs(PF)[1]
    after = reboot(sim)
    after.kernel.faults.silent_bind_failure[vf] = 1
    assert create_persisted_vfs(after.paths.root, after.writer) == [
        f"{PF}: not created early ({vf} not on vfio-pci after the probe); undone; the daemon tries again"]
    assert (after.numvfs(PF), after.autoprobe(PF)) == (0, "1")
    # and the engine, next, creates them
    engine = attach_engine(after).engine
    await engine.reconcile()
    assert [after.driver(vf) for vf in after.vfs(PF)] == ["vfio-pci"] * 3


async def test_no_failure_keeps_the_daemon_from_starting(make_sim, reboot):
    """A boundary that raises what the kernel never would: undone, said, and the start goes on."""
    sim = await persisted(make_sim)
    after = reboot(sim)

    class Surprising:
        def write(self, path, data):
            if str(path).endswith("driver_override"):
                raise ValueError("surprise")
            after.kernel.write(path, data)

        def load_module(self, name):
            after.kernel.load_module(name)

    assert create_persisted_vfs(after.paths.root, Surprising()) == [
        f"{PF}: not created early (ValueError('surprise')); undone; the daemon tries again"]
    assert (after.numvfs(PF), after.autoprobe(PF)) == (0, "1")
    (after.paths.root / early_binding.LIST_FILE).unlink()
    (after.paths.root / early_binding.LIST_FILE).mkdir()
    lines = create_persisted_vfs(after.paths.root, after.writer)
    assert len(lines) == 1 and lines[0].startswith("no VFs created early: ") and after.writer.calls == []


# ------------------------------------------------------------------------ the nicpassd command
@pytest.mark.parametrize(("argv", "root"), [
    ([], "/"), (["--root", "/x"], "/x"), (["--root=/x", "--log-level", "debug"], "/x"),
    (["--bus-address", "unix:path=/run/b", "--log-level=info"], "/"),
    (["--simulate"], None), (["--sim"], None), (["--check-config"], None), (["--help"], None), (["--version"], None),
    (["--record-topology", "-"], None), (["--root"], None), (["--log-level", "loud"], None), (["x"], None)])
def test_only_a_start_of_the_daemon_on_a_host_creates_vfs_before_the_arguments_are_parsed(argv, root, monkeypatch):
    from nicpassd import start

    monkeypatch.delenv(start.ROOT_ENV, raising=False)
    assert start.daemon_root(argv) == root


def test_the_root_variable_is_the_daemon_s(monkeypatch):
    from nicpassd import paths, start

    assert start.ROOT_ENV == paths.ROOT_ENV
    monkeypatch.setenv(paths.ROOT_ENV, "/srv/host")
    assert start.daemon_root([]) == "/srv/host" and start.daemon_root(["--root", "/y"]) == "/y"


def test_the_boot_path_imports_nothing_it_does_not_use():
    """Under a hypervisor these imports cost 0.4 s before the VFs (measured in the e2e guest)."""
    import subprocess
    import sys

    code = ("import sys; before = set(sys.modules); import nicpassd.start, nicpassd.host.early_vfs; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    imported = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.split())
    assert "nicpassd.host.early_vfs" in imported  # the check sees what is imported
    assert imported & {"argparse", "pathlib", "typing", "logging", "dataclasses", "tempfile", "inspect",
                       "nicpassd.paths", "nicpassd.atomicfile", "nicpassd.daemon"} == set()


def test_a_start_without_python_s_site_step_takes_it_after_the_early_pass(tmp_path):
    """The installed command runs ``python3 -S`` (packaging/install): the daemon's stack, found
    through the site step, is importable once the early pass is over."""
    import subprocess
    import sys

    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path.append({str(repo)!r}); from nicpassd.start import main; "
            f"sys.exit(main(['--check-config', {str(tmp_path / 'none.toml')!r}]))")
    ran = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip() == f"{tmp_path / 'none.toml'}: no such file; nicpassd runs with the defaults"


async def test_a_pf_persisted_on_a_driver_of_its_own_is_not_a_count_only_pf(sim):
    """Its VFs depend on what that driver does with SR-IOV: the engine's to judge, not a shell loop's."""
    from nicpassd.engine.store import DeviceDesire, identity_of

    snapshot = sim.engine.snapshot
    sim.engine.store.put(DeviceDesire(address=PF, identity=identity_of(snapshot.functions[PF], snapshot),
                                      driver="vfio-pci", num_vfs=2))
    sim.engine.store.put(DeviceDesire(address=PF2, identity=identity_of(snapshot.functions[PF2], snapshot),
                                      num_vfs=2))
    await sim.engine.reconcile()
    assert set(early_binding.read_list(sim.paths.root)["vf_counts"]) == {PF2}
