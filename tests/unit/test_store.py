"""The persistent desired state: versioned, atomic, migrating, refusing what it cannot read."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nicpassd import atomicfile
from nicpassd.engine import store as store_module
from nicpassd.engine.store import (SCHEMA_VERSION, DeviceDesire, Identity, RuntimeHolds, StateStore, StateStoreError,
                                   identity_of, migrate)

X710 = Identity(vendor_id="8086", device_id="1572", subsystem_vendor_id="8086", subsystem_device_id="0006",
                serial="3c-fd-fe-ff-ff-a0-00-00", permanent_mac="3c:fd:fe:a0:00:00", group_members=())

V1_FILE = {
    "version": 1,
    "devices": {
        "0000:3b:00.0": {
            "address": "0000:3b:00.0", "num_vfs": 4, "vf_driver": "vfio-pci", "driver": "",
            "identity": {"vendor_id": "8086", "device_id": "1572", "subsystem_vendor_id": "8086",
                         "subsystem_device_id": "0006", "serial": "3c-fd-fe-ff-ff-a0-00-00",
                         "permanent_mac": "3c:fd:fe:a0:00:00", "physfn": "", "group_members": []},
        },
        "0000:af:00.0": {
            "address": "0000:af:00.0", "num_vfs": None, "vf_driver": "", "driver": "vfio-pci",
            "identity": {"vendor_id": "8086", "device_id": "10d3", "subsystem_vendor_id": "8086",
                         "subsystem_device_id": "a01f", "serial": "", "permanent_mac": "00:1b:21:00:00:af",
                         "physfn": "", "group_members": ["1912:0014"]},
        },
    },
}


def desire(address: str = "0000:3b:00.0", **changes) -> DeviceDesire:
    return DeviceDesire(address=address, identity=X710, **changes)


# ------------------------------------------------------------------------------ basics
def test_round_trip(tmp_path):
    first = StateStore(tmp_path)
    first.put(desire(num_vfs=4, vf_driver="vfio-pci"))
    first.put(desire("0000:af:00.0", driver="vfio-pci"))
    again = StateStore(tmp_path)
    assert again.get("0000:3b:00.0") == desire(num_vfs=4, vf_driver="vfio-pci")
    assert again.get("0000:af:00.0").driver == "vfio-pci"
    assert again.remove("0000:af:00.0") is True and again.remove("0000:af:00.0") is False
    assert StateStore(tmp_path).get("0000:af:00.0") is None


def test_file_is_versioned_json_with_a_generation(tmp_path):
    store = StateStore(tmp_path)
    store.put(desire(num_vfs=2))
    store.put(desire(num_vfs=3))
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["version"] == SCHEMA_VERSION == 3
    assert data["generation"] == 2 == store.generation
    assert data["devices"]["0000:3b:00.0"]["num_vfs"] == 3


def test_missing_file_is_an_empty_state(tmp_path):
    assert StateStore(tmp_path / "absent").state.devices == {}


def test_several_changes_are_one_commit(tmp_path):
    store = StateStore(tmp_path)
    store.apply({"0000:3b:00.0": desire(num_vfs=2), "0000:af:00.0": desire("0000:af:00.0", driver="vfio-pci")})
    assert store.generation == 1
    store.apply({"0000:3b:00.0": None, "0000:5e:00.0": desire("0000:5e:00.0", num_vfs=1)})
    assert store.generation == 2 and sorted(StateStore(tmp_path).state.devices) == ["0000:5e:00.0", "0000:af:00.0"]


def test_an_empty_desire_is_not_kept(tmp_path):
    store = StateStore(tmp_path)
    store.put(desire(driver="vfio-pci"))
    store.put(desire())
    assert store.get("0000:3b:00.0") is None


def test_file_is_private(tmp_path):
    StateStore(tmp_path).put(desire(num_vfs=2))
    assert (tmp_path / "state.json").stat().st_mode & 0o077 == 0


# ------------------------------------------------------------------------- atomicity
def test_atomic_write_leaves_no_temp_files(tmp_path):
    store = StateStore(tmp_path)
    for count in range(3):
        store.put(desire(num_vfs=count + 1))
    store.remove("0000:3b:00.0")
    assert os.listdir(tmp_path) == ["state.json"]


def test_the_undo_journal_is_replaced_atomically_without_fsync_and_the_state_with_it(tmp_path, monkeypatch):
    """Issue 22: the journal describes the running kernel, which a power loss resets too, so it
    needs to survive the daemon's death only (the rename), not a power loss (fsync): written in
    the caller's thread, a few system calls. The state file, which outlives reboots, is fsynced."""
    from nicpassd.engine.journal import DeviceBefore, Journal
    from nicpassd.host.model import PciFunction

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomicfile.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    journal = Journal(tmp_path / "run")
    before = PciFunction("0000:3b:02.0", "8086", "10ca", "8086", "0000", "0x020000", driver="igbvf")
    entry = journal.begin("bind", {"0000:3b:02.0": DeviceBefore(before)})
    assert synced == []
    assert Journal(tmp_path / "run").entries.keys() == {entry.id}  # what a restart after a crash reads
    journal.end(entry)
    assert synced == [] and Journal(tmp_path / "run").entries == {}
    assert os.listdir(tmp_path / "run") == ["journal.json"]
    StateStore(tmp_path / "lib").put(desire(num_vfs=2))
    assert len(synced) == 2  # the file, then its directory


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    store.put(desire(num_vfs=2))
    old = (tmp_path / "state.json").read_text()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicfile.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.put(desire(num_vfs=8))
    assert os.listdir(tmp_path) == ["state.json"]
    assert (tmp_path / "state.json").read_text() == old
    assert store.get("0000:3b:00.0").num_vfs == 2  # memory agrees with the disk


def test_temp_files_left_by_a_crash_are_removed_at_load(tmp_path):
    StateStore(tmp_path).put(desire(num_vfs=2))
    (tmp_path / ".state-abc123").write_text('{"version": 2, "devi')  # a write a crash cut short
    store = StateStore(tmp_path)
    assert store.get("0000:3b:00.0").num_vfs == 2
    assert os.listdir(tmp_path) == ["state.json"]


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from nicpassd.engine.store import DeviceDesire, Identity, StateStore
    identity = Identity(vendor_id="8086", device_id="1572", serial="3c-fd-fe-ff-ff-a0-00-00")
    store = StateStore(Path(sys.argv[1]))
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        size = 1 + n % 40  # every commit rewrites all: the file must never mix two commits
        store.apply({f"0000:{bus:02x}:00.0": DeviceDesire(address=f"0000:{bus:02x}:00.0", identity=identity,
                                                          num_vfs=n % 64, vf_driver="vfio-pci") if bus < size else None
                     for bus in range(40)})
""")


def test_state_file_always_parses_when_the_writer_is_killed(tmp_path):
    """SIGKILL a process committing as fast as it can, at random moments: never a torn file."""
    rng = random.Random(4)
    for round_ in range(12):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.005, 0.08))
        process.send_signal(signal.SIGKILL)
        process.wait()
        store = StateStore(tmp_path)  # parses, validates, removes the dead writer's temp file
        assert store.state.devices, round_
        assert all(d.num_vfs == store.get("0000:00:00.0").num_vfs for d in store.state.devices.values())
        assert not [name for name in os.listdir(tmp_path) if name.startswith(".state-")]


# ------------------------------------------------------------------- versions, migration
@pytest.mark.parametrize("content", [
    "{not json",
    "[1, 2]",
    json.dumps({"version": SCHEMA_VERSION + 1, "devices": {}}),
    json.dumps({"devices": {}}),
    json.dumps({"version": "2", "devices": {}}),
    json.dumps({"version": 2, "devices": {"0000:3b:00.0": {"address": "0000:3b:00.0"}}}),
])
def test_unreadable_state_raises_with_the_path(tmp_path, content):
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(StateStoreError) as info:
        StateStore(tmp_path)
    assert str(tmp_path / "state.json") in str(info.value)


def test_a_newer_version_names_both_versions_and_is_left_untouched(tmp_path):
    text = json.dumps({"version": 7, "devices": {}})
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(StateStoreError, match=r"version 7.*reads 3.*newer nicpassd"):
        StateStore(tmp_path)
    assert (tmp_path / "state.json").read_text() == text


def test_v1_is_migrated_written_back_and_kept_as_backup(tmp_path):
    original = json.dumps(V1_FILE)
    (tmp_path / "state.json").write_text(original)
    store = StateStore(tmp_path)
    pf, nic = store.get("0000:3b:00.0"), store.get("0000:af:00.0")
    assert (pf.num_vfs, pf.vf_driver, nic.driver) == (4, "vfio-pci", "vfio-pci")
    assert pf.identity.group_members is None  # v1's [] meant "alone" or "unknown": not compared
    assert nic.identity.group_members == ("1912:0014",)
    assert pf.identity.vf_index == -1
    assert (tmp_path / "state.json.v1").read_text() == original
    on_disk = json.loads((tmp_path / "state.json").read_text())
    assert on_disk["version"] == SCHEMA_VERSION and on_disk["generation"] == 0
    assert StateStore(tmp_path).state == store.state  # no second migration


def test_migrations_form_a_chain_to_the_current_version():
    data, version = migrate(json.loads(json.dumps(V1_FILE)))
    assert (version, data["version"]) == (1, SCHEMA_VERSION)
    assert set(store_module.MIGRATIONS) == set(range(1, SCHEMA_VERSION))


# ------------------------------------------------------------------------------ identity
def test_identity_mismatch_names_the_first_difference():
    swapped = X710.model_copy(update={"serial": "3c-fd-fe-ff-ff-a0-99-99"})
    assert X710.mismatch(swapped) == "serial was 3c-fd-fe-ff-ff-a0-00-00 and is now 3c-fd-fe-ff-ff-a0-99-99"
    other_card = X710.model_copy(update={"device_id": "1583"})
    assert X710.mismatch(other_card) == "device_id was 1572 and is now 1583"


def test_identity_fields_unknown_on_one_side_are_not_a_mismatch():
    on_vfio = X710.model_copy(update={"permanent_mac": ""})  # no netdev while on vfio-pci
    assert X710.mismatch(on_vfio) == ""
    no_dsn_access = X710.model_copy(update={"serial": ""})  # config space beyond 64 bytes unreadable
    assert X710.mismatch(no_dsn_access) == ""
    assert X710.mismatch(X710) == ""


def test_identity_compares_group_mates_never_the_group_number():
    alone = X710
    assert alone.mismatch(X710.model_copy(update={"group_members": ("1912:0014",)})) == \
        "IOMMU group mates were none and are now 1912:0014"
    assert alone.mismatch(X710.model_copy(update={"group_members": None})) == ""  # no IOMMU now
    assert X710.model_copy(update={"group_members": None}).mismatch(X710) == ""  # not recorded


def test_a_vf_is_its_pf_and_its_index():
    vf = Identity(vendor_id="8086", device_id="154c", physfn="0000:3b:00.0", vf_index=2)
    assert vf.mismatch(vf.model_copy(update={"physfn": "0000:3b:00.1"})) == \
        "physfn was 0000:3b:00.0 and is now 0000:3b:00.1"
    assert vf.mismatch(vf.model_copy(update={"vf_index": 3})) == "vf_index was 2 and is now 3"
    assert vf.mismatch(vf.model_copy(update={"physfn": ""})) == "physfn was 0000:3b:00.0 and is now none"


def test_the_same_card_is_recognised_by_serial_and_function_number_or_by_mac():
    moved = X710.model_copy(update={"permanent_mac": ""})
    assert X710.same_card("0000:3b:00.0", moved, "0000:af:00.0")
    assert not X710.same_card("0000:3b:00.0", moved, "0000:af:00.1")  # the other port of that card
    by_mac = X710.model_copy(update={"serial": ""})
    assert by_mac.same_card("0000:3b:00.0", X710, "0000:d8:00.1")
    assert not X710.same_card("0000:3b:00.0", X710.model_copy(update={"device_id": "1583"}), "0000:af:00.0")
    assert not X710.same_card("0000:3b:00.0", X710.model_copy(update={"serial": "", "permanent_mac": ""}),
                              "0000:af:00.0")


def test_identity_of_a_device_on_the_simulated_host(ksim):
    snapshot = ksim.snapshot()
    nic = identity_of(snapshot.functions["0000:af:00.0"], snapshot)
    assert (nic.vendor_id, nic.device_id, nic.permanent_mac) == ("8086", "10d3", "00:1b:21:00:00:af")
    assert nic.group_members == ("1912:0014",)  # its USB group mate, by vendor:device
    pf = identity_of(snapshot.functions["0000:3b:00.0"], snapshot)
    assert (pf.serial, pf.group_members, pf.vf_index) == ("3c-fd-fe-ff-ff-a0-00-00", (), -1)


def test_identity_of_a_vf_records_its_index_and_not_its_siblings(ksim):
    ksim.kernel.write(ksim.dir("0000:3b:00.0") / "sriov_numvfs", "3")
    snapshot = ksim.snapshot()
    vf = identity_of(snapshot.functions["0000:3b:02.1"], snapshot)
    assert (vf.physfn, vf.vf_index, vf.device_id) == ("0000:3b:00.0", 1, "154c")
    pf = identity_of(snapshot.functions["0000:3b:00.0"], snapshot)
    assert pf.group_members == ()  # its own VFs are not "mates" that make it another device


# --------------------------------------------------------------------------- runtime holds
def test_runtime_holds_survive_a_restart_and_tolerate_garbage(tmp_path):
    holds = RuntimeHolds(tmp_path)
    holds.hold("0000:af:00.0", "op1")
    holds.hold("0000:3b:00.0", "op2")
    holds.release("0000:3b:00.0", "0000:5e:00.0")
    again = RuntimeHolds(tmp_path)
    assert "0000:af:00.0" in again and "0000:3b:00.0" not in again
    (tmp_path / "runtime.json").write_text("{broken")
    assert RuntimeHolds(tmp_path).holds == {}


# ------------------------------------------------------------------ bad files (issue 19)
def _state_with(tmp_path, **change):
    from nicpassd.engine.store import DeviceDesire, StateStore

    store = StateStore(tmp_path)
    store.put(DeviceDesire(address="0000:3b:00.0", identity=Identity(vendor_id="8086", device_id="1572"), num_vfs=2))
    data = json.loads((tmp_path / "state.json").read_text())
    entry = data["devices"]["0000:3b:00.0"]
    for key, value in change.items():
        if key == "key":
            data["devices"] = {value: entry}
        else:
            entry[key] = value
    return json.dumps(data)


@pytest.mark.parametrize("text, why", [
    ("num_vfs", -5), ("driver", "../../evil"), ("vf_driver", "ahci"), ("key", "not-an-address"),
    ("address", "0000:3b:00.0\n"),
])
def test_a_state_with_values_nicpassd_never_writes_is_refused_unchanged(tmp_path, text, why):
    from nicpassd.engine.store import StateStore, StateStoreError

    bad = _state_with(tmp_path, **{text: why})
    (tmp_path / "state.json").write_text(bad)
    with pytest.raises(StateStoreError):
        StateStore(tmp_path)
    assert (tmp_path / "state.json").read_text() == bad


def test_unreadable_state_files_are_refused_cleanly(tmp_path):
    from nicpassd.engine.store import StateStore, StateStoreError

    (tmp_path / "a").mkdir()
    (tmp_path / "a/state.json").write_bytes(b'{"version": 2, "devices": {"\xff": 1}}')
    with pytest.raises(StateStoreError, match="cannot read"):
        StateStore(tmp_path / "a")
    (tmp_path / "b/state.json").mkdir(parents=True)  # a directory in its place
    with pytest.raises(StateStoreError, match="cannot read"):
        StateStore(tmp_path / "b")
    (tmp_path / "c").write_text("")  # the state directory is a file
    with pytest.raises(StateStoreError, match="is not a directory"):
        StateStore(tmp_path / "c")


def test_a_config_that_is_not_utf8_or_out_of_range_is_refused(tmp_path):
    from nicpassd.engine.config import ConfigError, load_config

    path = tmp_path / "nicpassd.toml"
    path.write_bytes(b"[guard]\nmanagement_interfaces = [\"\xff\"]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
    path.write_text("[daemon]\nwrite_timeout = 1e308\n")
    with pytest.raises(ConfigError, match="write_timeout"):
        load_config(path)


def test_an_unreadable_runtime_hold_file_holds_what_it_names(tmp_path):
    """Issue 19: an unreadable holds file was ignored, so the reconciler undid runtime changes."""
    from nicpassd.engine.store import RuntimeHolds

    (tmp_path / "runtime.json").write_text('{"version": 1, "holds": {"0000:af:00.0": ')
    holds = RuntimeHolds(tmp_path)
    assert "0000:af:00.0" in holds and holds.holds["0000:af:00.0"].startswith("its runtime hold file was unreadable")
    assert [p.name.startswith("runtime.json.broken-") for p in tmp_path.iterdir()] == [True]
