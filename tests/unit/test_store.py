"""The persistent desired state: versioned, atomic, refusing what it cannot read."""

from __future__ import annotations

import json
import os

import pytest

from nicpassd.engine import store as store_module
from nicpassd.engine.store import DeviceDesire, Identity, StateStore, StateStoreError

X710 = Identity(vendor_id="8086", device_id="1572", subsystem_vendor_id="8086", subsystem_device_id="0006",
                serial="3c-fd-fe-ff-ff-a0-00-00", permanent_mac="3c:fd:fe:a0:00:00")


def desire(address: str = "0000:3b:00.0", **changes) -> DeviceDesire:
    return DeviceDesire(address=address, identity=X710, **changes)


def test_round_trip(tmp_path):
    first = StateStore(tmp_path)
    first.put(desire(num_vfs=4, vf_driver="vfio-pci"))
    first.put(desire("0000:af:00.0", driver="vfio-pci"))
    again = StateStore(tmp_path)
    assert again.get("0000:3b:00.0") == desire(num_vfs=4, vf_driver="vfio-pci")
    assert again.get("0000:af:00.0").driver == "vfio-pci"
    assert again.remove("0000:af:00.0") is True and again.remove("0000:af:00.0") is False
    assert StateStore(tmp_path).get("0000:af:00.0") is None


def test_file_is_versioned_json(tmp_path):
    StateStore(tmp_path).put(desire(num_vfs=2))
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["version"] == 1
    assert data["devices"]["0000:3b:00.0"]["num_vfs"] == 2


def test_missing_file_is_an_empty_state(tmp_path):
    assert StateStore(tmp_path / "absent").state.devices == {}


def test_atomic_write_leaves_no_temp_files(tmp_path):
    store = StateStore(tmp_path)
    for count in range(3):
        store.put(desire(num_vfs=count + 1))
    store.remove("0000:3b:00.0")
    assert os.listdir(tmp_path) == ["state.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    store.put(desire(num_vfs=2))
    old = (tmp_path / "state.json").read_text()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.put(desire(num_vfs=8))
    assert os.listdir(tmp_path) == ["state.json"]
    assert (tmp_path / "state.json").read_text() == old
    assert store.get("0000:3b:00.0").num_vfs == 2  # memory agrees with the disk


@pytest.mark.parametrize("content", [
    "{not json",
    "[1, 2]",
    json.dumps({"version": 2, "devices": {}}),
    json.dumps({"devices": {}}),
    json.dumps({"version": 1, "devices": {"0000:3b:00.0": {"address": "0000:3b:00.0"}}}),
])
def test_unreadable_state_raises_with_the_path(tmp_path, content):
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(StateStoreError) as info:
        StateStore(tmp_path)
    assert str(tmp_path / "state.json") in str(info.value)


def test_wrong_version_names_both_versions(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"version": 7, "devices": {}}))
    with pytest.raises(StateStoreError, match=r"version 7.*reads 1"):
        StateStore(tmp_path)


def test_identity_mismatch_names_the_first_difference():
    swapped = X710.model_copy(update={"serial": "3c-fd-fe-ff-ff-a0-99-99"})
    assert X710.mismatch(swapped) == "serial was 3c-fd-fe-ff-ff-a0-00-00 and is now 3c-fd-fe-ff-ff-a0-99-99"
    other_card = X710.model_copy(update={"device_id": "1583"})
    assert X710.mismatch(other_card) == "device_id was 1572 and is now 1583"


def test_identity_fields_unknown_on_one_side_are_not_a_mismatch():
    on_vfio = X710.model_copy(update={"permanent_mac": ""})  # no netdev while on vfio-pci
    assert X710.mismatch(on_vfio) == ""
    assert X710.mismatch(X710) == ""
