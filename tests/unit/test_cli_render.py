"""Rendering from plain dicts: tables for people, JSON for scripts."""

import json

import pytest
from nicpassctl import render

DEVICE_PROPS = [
    "Address", "VendorId", "DeviceId", "SubsystemVendorId", "SubsystemDeviceId", "Driver", "IommuGroup",
    "Interfaces", "PhysicalFunction", "TotalVfs", "NumVfs", "Protected", "ProtectionReasons", "LeasedTo",
    "Persisted", "DesiredDriver", "IsNetwork", "ClassCode", "Drift",
]
SNAKE = [
    "address", "vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id", "driver", "iommu_group",
    "interfaces", "physical_function", "total_vfs", "num_vfs", "protected", "protection_reasons", "leased_to",
    "persisted", "desired_driver", "is_network", "class_code", "drift",
]


def dev(address, **kw):
    props = {
        "Address": address, "VendorId": "0x8086", "DeviceId": "0x1572", "SubsystemVendorId": "0x8086",
        "SubsystemDeviceId": "0x0000", "Driver": "i40e", "IommuGroup": 30, "Interfaces": [],
        "PhysicalFunction": "", "TotalVfs": 0, "NumVfs": 0, "Protected": False, "ProtectionReasons": [],
        "LeasedTo": "", "Persisted": False, "DesiredDriver": "", "IsNetwork": True, "ClassCode": "0x020000",
        "Drift": "",
    }
    props.update(kw)
    return props


def topology():
    return [
        dev("0000:3b:02.1", DeviceId="0x154c", Driver="vfio-pci", IommuGroup=41, PhysicalFunction="0000:3b:00.0",
            LeasedTo="6f1c2d3e-aaaa-bbbb-cccc-000000000001", Persisted=True, DesiredDriver="vfio-pci"),
        dev("0000:3b:00.0", Interfaces=["enp59s0f0"], TotalVfs=64, NumVfs=2, Persisted=True),
        dev("0000:3b:02.0", DeviceId="0x154c", Driver="iavf", IommuGroup=40, PhysicalFunction="0000:3b:00.0",
            Interfaces=["enp59s0f0v0"]),
        dev("0000:01:00.0", Interfaces=["eno1"], IommuGroup=12, Driver="igb", Protected=True,
            ProtectionReasons=["carries the IPv4 default route", "lower device of bond0"]),
        dev("0000:01:00.1", IsNetwork=False, ClassCode="0x0c0330", Driver="xhci_hcd", IommuGroup=12),
        dev("0000:0a:00.0", Driver="", IommuGroup=-1, Persisted=True, DesiredDriver="vfio-pci",
            Drift="the kernel shows no driver but vfio-pci is persisted."),
    ]


def test_snake_case():
    assert [render.snake(p) for p in DEVICE_PROPS] == SNAKE
    assert render.snake("DesiredVfs") == "desired_vfs"


def test_address_from_path():
    assert render.address_from_path("/org/nicpass/NicPass1/devices/0000_3b_00_0") == "0000:3b:00.0"
    assert render.address_from_path("/org/nicpass/NicPass1") == "NicPass1"


def test_list_table_order_roles_and_nesting():
    text = render.list_text(topology())
    lines = text.splitlines()
    assert lines[0].split() == ["ADDRESS", "IFACE", "DRIVER", "VENDOR:DEVICE", "GROUP", "ROLE", "VFS", "PROT",
                                "LEASED", "PERSISTED"]
    addrs = [line.split()[0] for line in lines[1:] if line and not line.startswith("*")]
    assert addrs == ["0000:01:00.0", "0000:0a:00.0", "0000:3b:00.0", "0000:3b:02.0", "0000:3b:02.1"]
    assert "0000:01:00.1" not in text  # not a NIC: only with --all
    row = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith("*")}
    assert row["0000:3b:02.0"].startswith("  0000:3b:02.0")  # VF indented under its PF
    assert row["0000:3b:00.0"].split() == ["0000:3b:00.0", "enp59s0f0", "i40e", "8086:1572", "30", "PF",
                                            "2/64", "no", "-", "yes"]
    assert row["0000:3b:02.1"].split() == ["0000:3b:02.1", "-", "vfio-pci", "8086:154c", "41", "VF", "-", "no",
                                            "6f1c2d3e", "vfio-pci"]
    assert row["0000:01:00.0"].split()[5:8] == ["-", "-", "yes"]
    assert row["0000:0a:00.0"].split() == ["0000:0a:00.0", "-", "-", "8086:1572", "-", "-", "-", "no", "-",
                                            "vfio-pci*"]
    assert lines[-1] == "* 0000:0a:00.0: the kernel shows no driver but vfio-pci is persisted."


def test_list_all_includes_group_mates():
    text = render.list_text(topology(), show_all=True)
    assert "0000:01:00.1" in text and "xhci_hcd" in text


def test_list_persisted_vf_count_when_daemon_exposes_it():
    text = render.list_text([dev("0000:3b:00.0", TotalVfs=8, NumVfs=4, Persisted=True, DesiredVfs=4)])
    assert text.splitlines()[1].split()[-1] == "vfs=4"
    text = render.list_text([dev("0000:3b:00.0", TotalVfs=8, NumVfs=0, Persisted=True, DesiredVfs=0,
                                 DesiredDriver="vfio-pci")])
    assert text.splitlines()[1].split()[-1] == "vfs=0,vfio-pci"
    text = render.list_text([dev("0000:3b:02.0", Persisted=True, DesiredVfs=-1, DesiredDriver="vfio-pci")])
    assert text.splitlines()[1].split()[-1] == "vfio-pci"
    # a VF's desired driver comes from its PF's persisted state: shown even when it is not Persisted itself
    text = render.list_text([dev("0000:3b:02.0", Persisted=False, DesiredVfs=-1, DesiredDriver="vfio-pci")])
    assert text.splitlines()[1].split()[-1] == "vfio-pci"
    text = render.list_text([dev("0000:3b:02.0", Persisted=False, DesiredVfs=-1)])
    assert text.splitlines()[1].split()[-1] == "-"


def test_list_empty():
    assert render.list_text([]) == "No network functions found."


def test_list_json_every_property_snake_case():
    records = render.list_json(topology())
    assert json.loads(json.dumps(records)) == records
    assert [r["address"] for r in records] == ["0000:01:00.0", "0000:0a:00.0", "0000:3b:00.0", "0000:3b:02.0",
                                               "0000:3b:02.1"]
    for r in records:
        assert set(r) == set(SNAKE)
    assert records[0]["protection_reasons"] == ["carries the IPv4 default route", "lower device of bond0"]
    assert len(render.list_json(topology(), show_all=True)) == 6


def test_list_json_keeps_properties_beyond_the_contract():
    (r,) = render.list_json([dev("0000:3b:00.0", DesiredVfs=4, SomethingNew="x")])
    assert r["desired_vfs"] == 4 and r["something_new"] == "x"


EXPLAIN = {
    "address": "0000:3b:00.0", "allowed": False,
    "verdict": "0000:3b:00.0 may not be handed to a VM: its IOMMU group has a member bound to a host driver.",
    "protected": False, "reasons": [], "iommu_group": 30,
    "group_members": [["0000:3b:00.0", "i40e"], ["0000:3b:00.1", ""]], "group_viable": False,
    "leased_to": "", "persisted": True, "desired_driver": "", "driver": "i40e", "interfaces": ["enp59s0f0"],
}


def test_show_text_has_every_property_and_explain():
    text = render.show_text(dev("0000:3b:00.0", Interfaces=["enp59s0f0"], TotalVfs=64), EXPLAIN)
    assert text.splitlines()[0] == EXPLAIN["verdict"]  # already names the device: not repeated
    for key in SNAKE:
        assert render.snake(key).replace("_", " ") in text
    assert "0000:3b:00.1 (no driver)" in text and "0000:3b:00.0 (i40e)" in text
    assert "group viable" in text
    labels = [line.strip().split("  ")[0] for line in text.splitlines() if line.startswith("  ") and line[2] != " "]
    assert len(labels) == len(set(labels)), labels  # issue 20: show repeated nine fields in Device and Explain


def test_show_text_without_device_object():
    text = render.show_text(None, {**EXPLAIN, "verdict": "Allowed."})
    assert text.splitlines()[0] == "0000:3b:00.0: Allowed."
    assert "Device" not in text.splitlines() and "Explain" in text


def test_show_json():
    doc = render.show_json(dev("0000:3b:00.0"), EXPLAIN)
    assert json.loads(render.dumps(doc)) == doc
    assert set(doc) == {"device", "explain"}
    assert set(doc["device"]) == set(SNAKE)
    assert set(doc["explain"]) == set(EXPLAIN)
    assert doc["explain"]["group_members"] == [{"address": "0000:3b:00.0", "driver": "i40e"},
                                               {"address": "0000:3b:00.1", "driver": ""}]


FINDINGS = [
    ["iommu", "ok", "IOMMU is enabled (DMAR).", ""],
    ["acs-override", "warn", "pcie_acs_override is set on the kernel command line.",
     "remove pcie_acs_override from the kernel command line."],
    ["vfio-module", "fail", "vfio-pci is not loaded.", "run `modprobe vfio-pci`."],
]


def test_check_text_and_json():
    text = render.check_text(FINDINGS)
    assert "[fail] vfio-module" in text and "remedy: run `modprobe vfio-pci`." in text
    assert "[ ok ] iommu" in text
    assert text.splitlines()[-1] == "1 ok, 1 warning(s), 1 failure(s)"
    doc = render.check_json(FINDINGS)
    assert doc[2] == {"id": "vfio-module", "level": "fail", "message": "vfio-pci is not loaded.",
                      "remedy": "run `modprobe vfio-pci`."}
    assert render.check_failed(FINDINGS)
    assert not render.check_failed(FINDINGS[:2])


def test_guard():
    protected = [["0000:3b:00.0", ["member of IOMMU group 30 with 0000:01:00.0"]],
                 ["0000:01:00.0", ["carries the IPv4 default route", "lower device of bond0"]]]
    text = render.guard_text(protected)
    lines = text.splitlines()
    assert lines[0].split() == ["ADDRESS", "REASONS"]
    assert lines[1].startswith("0000:01:00.0") and lines[1].endswith("carries the IPv4 default route")
    assert lines[2].strip() == "lower device of bond0"
    assert render.guard_json(protected)[0] == {"address": "0000:01:00.0",
                                               "reasons": ["carries the IPv4 default route",
                                                           "lower device of bond0"]}
    assert render.guard_text([]) == "No device is protected."


LEASES = [{"lease_id": "l-1", "vm_name": "web", "vm_uuid": "6f1c2d3e-aaaa-bbbb-cccc-000000000001",
           "state": "active", "devices": ["0000:3b:02.0", "0000:3b:02.1"], "expires": 0, "pid": 4242}]


def test_leases():
    text = render.leases_text(LEASES)
    assert text.splitlines()[0].split() == ["LEASE", "VM", "UUID", "STATE", "DEVICES", "EXPIRES", "PID"]
    assert "0000:3b:02.1" in text.splitlines()[2]
    assert render.leases_json(LEASES) == LEASES
    assert render.leases_text([]) == "No leases."


def test_table_multiline_cells_align():
    text = render.table(["A", "B", "C"], [["x", "1\n2", "z"]])
    assert text.splitlines() == ["A  B  C", "x  1  z", "   2"]


@pytest.mark.parametrize(
    "event, expected",
    [
        ({"event": "changed", "address": "0000:3b:00.0", "path": "/p", "properties": {"NumVfs": 4, "Driver": "i40e"},
          "invalidated": []}, "changed 0000:3b:00.0 NumVfs=4 Driver=i40e"),
        ({"event": "changed", "address": "0000:3b:00.0", "path": "/p",
          "properties": {"Interfaces": ["a", "b"], "LeasedTo": "", "Protected": True}, "invalidated": ["Drift"]},
         'changed 0000:3b:00.0 Interfaces=a,b LeasedTo="" Protected=yes Drift=?'),
        ({"event": "changed", "address": "0000:3b:02.0", "path": "/p",
          "properties": {"Drift": 'persisted on "vfio-pci", bound to iavf', "Driver": "iavf"}, "invalidated": []},
         'changed 0000:3b:02.0 Drift="persisted on \\"vfio-pci\\", bound to iavf" Driver=iavf'),
        ({"event": "added", "address": "0000:3b:02.0", "path": "/p"}, "added 0000:3b:02.0"),
        ({"event": "removed", "address": "0000:3b:02.0", "path": "/p"}, "removed 0000:3b:02.0"),
        ({"event": "lease", "lease_id": "l-1", "vm_uuid": "u-1", "state": "active"}, "lease l-1 u-1 active"),
        ({"event": "daemon-stopped", "owner": ":1.4"}, "daemon stopped"),
        ({"event": "daemon-started", "owner": ":1.5"}, "daemon started"),
    ],
)
def test_event_text(event, expected):
    line = render.event_text({"time": 43201.123, **event})
    stamp, rest = line.split(" ", 1)
    assert rest == expected
    assert len(stamp) == 12 and stamp[2] == ":" and stamp[8] == "."


def test_event_json_is_one_line_snake_case():
    line = render.event_json({"time": 1.5, "event": "changed", "address": "0000:3b:00.0", "path": "/p",
                              "interface": "org.nicpass.NicPass1.Device", "properties": {"NumVfs": 4},
                              "invalidated": ["LeasedTo"]})
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["properties"] == {"num_vfs": 4} and doc["invalidated"] == ["leased_to"]
    assert doc["event"] == "changed" and doc["time"] == 1.5


def test_json_says_none_with_null():
    """Issue 20: D-Bus says "no group", "no driver", "no lease" with -1 and ""; JSON with null."""
    record = render.device_record({"Address": "0000:3b:02.0", "IommuGroup": -1, "Driver": "", "LeasedTo": "",
                                   "DesiredVfs": -1, "NumVfs": 0, "Interfaces": [], "PhysicalFunction": "0000:3b:00.0"})
    assert record == {"address": "0000:3b:02.0", "driver": None, "iommu_group": None, "physical_function": "0000:3b:00.0",
                      "num_vfs": 0, "desired_vfs": None, "leased_to": None, "interfaces": []}
