"""The guard: which functions the host cannot give away, and why — and that no request ever
changes one of them (hypothesis property over random hosts and request sequences)."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nicpassd.engine.config import GuardSettings
from nicpassd.engine.guard import compute_protected
from nicpassd.errors import NicpassError, Protected
from nicpassd.host import sysfs
from nicpassd.sim.topology import Address, Route, Topology

settings.register_profile("nicpassd-unit", max_examples=30, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = "thorough" if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else "nicpassd-unit"


def nic(address: str, netdev: str, *, group: int | None = None, device: str = "1572", **extra: object) -> str:
    lines = [f'address = "{address}"', 'vendor = "8086"', f'device = "{device}"', 'driver = "i40e"',
             f'netdev = "{netdev}"']
    if group is not None:
        lines.append(f"iommu_group = {group}")
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in extra.items()]
    return "[[functions]]\n" + "\n".join(lines) + "\n"


def link(name: str, kind: str, *lowers: str) -> str:
    return f'[[links]]\nname = "{name}"\nkind = "{kind}"\nlowers = {list(lowers)!r}\n'.replace("'", '"')


def route(dev: str, gateway: str = "192.0.2.1", dst: str = "default") -> str:
    family = 6 if ":" in gateway else 4
    return f'[[routes]]\ndev = "{dev}"\ndst = "{dst}"\ngateway = "{gateway}"\nfamily = {family}\n'


def address(dev: str, value: str) -> str:
    return f'[[addresses]]\ndev = "{dev}"\naddress = "{value}"\n'


A, B, C = "0000:10:00.0", "0000:11:00.0", "0000:12:00.0"
NICS = nic(A, "eno1") + nic(B, "eno2", device="1521") + nic(C, "enp3")
SATA = ('[[functions]]\naddress = "0000:00:17.0"\nvendor = "8086"\ndevice = "a352"\nclass = "010601"\n'
        'driver = "ahci"\ndisks = ["sda"]\n')


def protected(make_kernel, toml: str, **guard: object) -> dict[str, tuple[str, ...]]:
    sim = make_kernel(toml)
    result = compute_protected(sim.snapshot(), GuardSettings(**guard))
    return {address: entry.reasons for address, entry in result.entries.items()}


def guard_of(sim, **guard: object):
    return compute_protected(sim.snapshot(), GuardSettings(**guard))


# ------------------------------------------------------------------------------ closure
def test_bridge_over_bond_over_physical(make_kernel):
    got = protected(make_kernel, NICS + link("bond0", "bond", "eno1", "eno2") + link("br0", "bridge", "bond0")
                    + route("br0"))
    assert set(got) == {A, B}
    assert "IPv4 default route 0.0.0.0/0 via 192.0.2.1: br0 → bond0 → eno1" in got[A]
    assert "IPv4 default route 0.0.0.0/0 via 192.0.2.1: br0 → bond0 → eno2" in got[B]


def test_vlan_on_a_physical_nic(make_kernel):
    got = protected(make_kernel, NICS + link("eno1.100", "vlan", "eno1") + route("eno1.100"))
    assert set(got) == {A} and any("eno1.100 → eno1" in reason for reason in got[A])


def test_macvlan_on_a_vlan_on_a_bond(make_kernel):
    toml = (NICS + link("bond0", "bond", "eno1", "eno2") + link("bond0.7", "vlan", "bond0")
            + link("mv0", "macvlan", "bond0.7") + route("mv0"))
    got = protected(make_kernel, toml)
    assert set(got) == {A, B} and any("mv0 → bond0.7 → bond0 → eno2" in reason for reason in got[B])


def test_ipv6_only_default_route(make_kernel):
    got = protected(make_kernel, NICS + route("enp3", gateway="fe80::1"))
    assert set(got) == {C} and got[C] == ("IPv6 default route ::/0 via fe80::1: enp3",)


def test_without_default_route_nothing_is_protected(make_kernel):
    assert protected(make_kernel, NICS + route("enp3", gateway="", dst="192.0.2.0/24")) == {}


def test_configured_management_interface(make_kernel):
    got = protected(make_kernel, NICS, management_interfaces=("enp3",))
    assert got == {C: ("configured management interface: enp3",)}


def test_configured_management_prefix(make_kernel):
    toml = NICS + route("eno2", gateway="", dst="10.1.0.0/16") + route("enp3", gateway="", dst="192.0.2.0/24")
    got = protected(make_kernel, toml, management_prefixes=("10.0.0.0/8",))
    assert set(got) == {B} and "in management prefix 10.0.0.0/8" in got[B][0]


@pytest.mark.parametrize("item, expected", [
    (C, {C}), ("12:00.0", {C}), ("8086:1521", {B}), ("8086:1572", {A, C})])
def test_never_touch_by_address_or_vendor_device(make_kernel, item, expected):
    got = protected(make_kernel, NICS, never_touch=(item,))
    assert set(got) == expected
    assert all(reasons == (f"configured never_touch ({item})",) for reasons in got.values())


def test_pf_of_a_protected_vf(make_kernel):
    sim = make_kernel(nic(A, "eno1", sriov_totalvfs=4, vf_device="154c", vf_driver="iavf", vf_offset=16)
                      + nic(B, "eno2", device="1521"))
    sim.kernel.write(sim.paths.pci_device(A) / "sriov_numvfs", "2")
    sim.kernel.set_routes([Route(dev="eno1v1", dst="default", gateway="192.0.2.1")])
    got = compute_protected(sim.snapshot(), GuardSettings())
    vf = sim.vfs(A)[1]
    assert set(got.entries) == {vf, A}
    assert got.reasons(A) == (f"PF of protected VF {vf} (changing its VFs resets them)",)


def test_iommu_group_mates_but_not_bridges(make_kernel):
    toml = (nic(A, "eno1", group=20) + nic(B, "eno2", group=20) + nic(C, "enp3")
            + '[[functions]]\naddress = "0000:00:1c.0"\nvendor = "8086"\ndevice = "a33c"\nclass = "060400"\n'
              'driver = "pcieport"\niommu_group = 20\n'
            + route("eno1"))
    got = protected(make_kernel, toml)
    assert set(got) == {A, B}
    assert got[B] == ("shares IOMMU group 20 with protected 0000:10:00.0",)


def test_any_depth_bridge_bond_vlan_macvlan_physical(make_kernel):
    toml = (NICS + link("mv0", "macvlan", "eno1") + link("mv0.5", "vlan", "mv0") + link("bond0", "bond", "mv0.5")
            + link("br0", "bridge", "bond0") + route("br0", gateway="fe80::1"))
    got = protected(make_kernel, toml)
    assert got == {A: ("IPv6 default route ::/0 via fe80::1: br0 → bond0 → mv0.5 → mv0 → eno1",)}


def test_address_in_a_management_prefix_protects_without_any_route(make_kernel):
    toml = NICS + address("eno2", "10.1.2.3/16") + address("enp3", "2001:db8:7::5/64")
    got = protected(make_kernel, toml, management_prefixes=("10.0.0.0/8", "2001:db8:7::/48"))
    assert got[B] == ("address 10.1.2.3/16 in management prefix 10.0.0.0/8: eno2",)
    assert got[C] == ("address 2001:db8:7::5/64 in management prefix 2001:db8:7::/48: enp3",)  # from if_inet6
    assert A not in got


def test_the_route_that_carries_a_management_prefix_is_protected(make_kernel):
    # 10.1.0.0/16 is reached through the 10.0.0.0/8 route on eno2, not the default route on enp3.
    toml = NICS + route("eno2", gateway="192.0.2.9", dst="10.0.0.0/8") + route("enp3")
    got = protected(make_kernel, toml, management_prefixes=("10.1.0.0/16",))
    assert got[B] == ("route 10.0.0.0/8 via 192.0.2.9 carries management prefix 10.1.0.0/16: eno2",)
    assert got[C] == ("IPv4 default route 0.0.0.0/0 via 192.0.2.1: enp3",)  # the default route only
    got = protected(make_kernel, NICS + route("enp3"), management_prefixes=("10.1.0.0/16",))
    assert "IPv4 default route 0.0.0.0/0 via 192.0.2.1 carries management prefix 10.1.0.0/16: enp3" in got[C]


def test_last_nic_with_a_carrier_and_an_address_is_the_way_in(make_kernel):
    sim = make_kernel(NICS + address("enp3", "198.51.100.7/24") + address("eno1", "fe80::1/64"))
    entry = guard_of(sim).entries[C]  # eno1's link-local address is no way in
    assert entry.reasons == ("last way into the host (no other interface has a carrier and an address): "
                             "enp3 198.51.100.7/24: enp3",)
    assert entry.management and not entry.overridable
    # A second way in: neither is the last any more; losing its carrier makes enp3 the last again.
    sim.kernel.set_addresses([Address(dev="enp3", address="198.51.100.7/24"),
                              Address(dev="eno2", address="203.0.113.5/24")])
    assert set(guard_of(sim).entries) == set()
    sim.kernel.set_carrier("eno2", False)
    assert set(guard_of(sim).entries) == {C}


def test_a_bond_is_one_way_in_only_through_its_live_slaves(make_kernel):
    sim = make_kernel(NICS + link("bond0", "bond", "eno1", "eno2") + address("bond0", "198.51.100.7/24"))
    assert guard_of(sim).entries == {}  # either slave keeps the host reachable
    sim.kernel.set_carrier("eno2", False)
    assert guard_of(sim).reasons(A) == ("last way into the host (no other interface has a carrier and an "
                                        "address): bond0 198.51.100.7/24: bond0 → eno1",)


def test_storage_of_the_root_file_system(ksim):
    entry = guard_of(ksim).entries["0000:00:17.0"]
    assert entry.reasons == ("storage of the root file system: / on /dev/sda2 → sda2 → sda → 0000:00:17.0",)
    assert entry.management and not entry.present  # in a group of its own: reported, not inventoried


def test_a_nic_sharing_the_root_storage_group_is_protected(make_kernel):
    sim = make_kernel('root = "sda1"\n' + SATA.replace("disks", "iommu_group = 9\ndisks") + nic(A, "eno1", group=9)
                      + nic(B, "eno2"))
    got = guard_of(sim)
    assert got.reasons(A) == ("shares IOMMU group 9 with protected 0000:00:17.0",)
    assert got.entries[A].overridable and got.entries["0000:00:17.0"].present
    assert "/ on /dev/sda1 → sda1 → sda → 0000:00:17.0" in got.reasons("0000:00:17.0")[0]


def test_root_on_lvm_over_two_disks_protects_both_controllers(make_kernel):
    sim = make_kernel(SATA + SATA.replace("00:17.0", "00:18.0").replace('"sda"', '"nvme0n1"') + NICS)
    block = sim.paths.sys / "class/block"
    dm = sim.paths.sys / "devices/virtual/block/dm-0"
    (dm / "slaves").mkdir(parents=True)
    for disk in ("sda", "nvme0n1"):
        (dm / "slaves" / disk).symlink_to(block / disk)
    (block / "dm-0").symlink_to(dm)
    (sim.paths.under("/proc/self")).mkdir(parents=True, exist_ok=True)
    (sim.paths.under("/proc/self/mountinfo")).write_text("22 1 0:25 / / rw - btrfs /dev/mapper/vg-root rw\n")
    (sim.paths.under("/dev/mapper")).mkdir(parents=True)
    (sim.paths.under("/dev/mapper/vg-root")).symlink_to("../dm-0")
    got = guard_of(sim)
    assert got.reasons("0000:00:17.0") == ("storage of the root file system: / on /dev/mapper/vg-root → dm-0 → sda "
                                           "→ 0000:00:17.0",)
    assert "dm-0 → nvme0n1 → 0000:00:18.0" in got.reasons("0000:00:18.0")[0]


def test_pf_of_a_management_vf_is_management_but_a_group_mate_is_overridable(make_kernel):
    sim = make_kernel(nic(A, "eno1", group=20, sriov_totalvfs=4, vf_device="154c", vf_driver="iavf", vf_offset=16)
                      + nic(B, "eno2", device="1521", group=20))
    sim.kernel.write(sim.paths.pci_device(A) / "sriov_numvfs", "2")
    sim.kernel.set_routes([Route(dev="eno1v0", dst="default", gateway="192.0.2.1")])
    got = guard_of(sim)
    vf = sim.vfs(A)[0]
    assert got.entries[vf].management and got.entries[A].management
    assert got.entries[B].overridable and got.reasons(B) == ("shares IOMMU group 20 with protected 0000:10:00.0",)
    with pytest.raises(Protected, match="even with force"):
        got.check(A, "bind it", force=True)
    assert got.check(B, "bind it", force=True) is got.entries[B]
    with pytest.raises(Protected, match="override with force"):
        got.check(B, "bind it")


def test_never_touch_reports_an_absent_address_and_notes_name_unknown_interfaces(make_kernel):
    got = guard_of(make_kernel(NICS), never_touch=("00:1f.3",), management_interfaces=("eth9",))
    assert got.entries["0000:00:1f.3"].reasons == ("configured never_touch (00:1f.3)",)
    assert not got.entries["0000:00:1f.3"].present
    assert got.notes == ("configured management interface eth9 does not exist",)


def test_addresses_follow_their_interface_and_events_announce_changes(make_kernel):
    sim = make_kernel(NICS + address("enp3", "198.51.100.7/24") + address("enp3", "2001:db8::7/64")
                      + route("enp3", gateway="", dst="198.51.100.0/24"))
    snapshot = sim.snapshot()
    assert {(a.family, a.address, a.dev) for a in snapshot.addresses} == {
        (4, "198.51.100.7/24", "enp3"), (6, "2001:db8::7/64", "enp3")}
    sim.events.clear()
    sim.kernel.set_addresses([Address(dev="eno1", address="192.0.2.50/24")])
    sim.kernel.set_carrier("eno1", False)
    assert sim.event_tuples() == [("change", "route", ""), ("change", "route", "eno1")]
    assert [a.address for a in sim.snapshot().addresses] == ["192.0.2.50/24"]
    assert not sim.snapshot().links["eno1"].carrier
    # The interface goes (bound to vfio-pci): the kernel drops its addresses and routes.
    sim.kernel.set_addresses([Address(dev="enp3", address="198.51.100.7/24")])
    sim.kernel.load_module("vfio-pci")
    sim.kernel.write(sim.paths.pci_device(C) / "driver_override", "vfio-pci")
    sim.kernel.write(sim.paths.pci_drivers / "i40e/unbind", C)
    assert sim.snapshot().addresses == () and sim.snapshot().routes == ()


# ---------------------------------------------------------------- property: guard holds
ADDRESS_POOL = ["192.0.2.10/24", "10.1.2.3/16", "2001:db8::10/64", "fe80::1/64", "198.51.100.7/24"]


@st.composite
def hosts(draw) -> tuple[Topology, dict]:
    functions, names = [], []
    for i in range(draw(st.integers(1, 4))):
        fn = {"address": f"0000:{0x10 + i:02x}:00.0", "vendor": "8086",
              "device": draw(st.sampled_from(["1572", "1521"])), "driver": "i40e",
              "netdev": f"nic{i}", "mac": f"02:00:00:00:{i:02x}:00", "carrier": draw(st.booleans() | st.just(True))}
        group = draw(st.sampled_from([None, None, 70, 71]))
        if group is not None:
            fn["iommu_group"] = group
        if draw(st.booleans()):
            fn.update(sriov_totalvfs=draw(st.integers(1, 3)), vf_device="154c", vf_driver="iavf", vf_offset=16)
        functions.append(fn)
        names.append(fn["netdev"])
    if draw(st.booleans()):  # a USB controller in group 70
        functions.append({"address": "0000:70:00.0", "vendor": "1912", "device": "0014", "class": "0c0330",
                          "driver": "xhci_hcd", "iommu_group": 70})
    if draw(st.booleans()):  # a root port in group 71
        functions.append({"address": "0000:00:1c.0", "vendor": "8086", "device": "a33c", "class": "060400",
                          "driver": "pcieport", "iommu_group": 71})
    root = ""
    if draw(st.booleans()):  # the root file system's SATA controller, perhaps in a NIC's group
        functions.append({"address": "0000:00:17.0", "vendor": "8086", "device": "a352", "class": "010601",
                          "driver": "ahci", "iommu_group": draw(st.sampled_from([70, 71, 72])), "disks": ["sda"]})
        root = "sda2"
    links, enslaved = [], set()
    for j in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["bond", "bridge", "vlan", "macvlan"]))
        if kind in ("bond", "bridge"):  # a netdev has at most one master
            free = [name for name in names if name not in enslaved]
            if not free:
                continue
            lowers = draw(st.lists(st.sampled_from(free), min_size=1, max_size=2, unique=True))
            enslaved.update(lowers)
        else:
            lowers = [draw(st.sampled_from(names))]
        links.append({"name": f"{kind}{j}", "kind": kind, "lowers": lowers})
        names.append(f"{kind}{j}")
    if draw(st.booleans()):  # a WireGuard tunnel, its endpoint reached through some interface
        links.append({"name": "wg9", "kind": "wireguard", "remotes": ["203.0.113.5"]})
        names.append("wg9")
    routes, rules, extra = [], [], {}
    dev = draw(st.sampled_from([None, *names]))
    if dev is not None:
        gateway = draw(st.sampled_from(["192.0.2.1", "fe80::1"]))
        if draw(st.booleans()) and len(names) > 1:  # ECMP over two interfaces
            second = draw(st.sampled_from([n for n in names if n != dev]))
            family_gateway = "192.0.2.2" if ":" not in gateway else "fe80::2"
            routes.append({"dst": "default", "nexthops": [{"dev": dev, "gateway": gateway},
                                                          {"dev": second, "gateway": family_gateway}]})
        else:
            routes.append({"dev": dev, "dst": "default", "gateway": gateway})
    if "wg9" in names:
        routes.append({"dev": draw(st.sampled_from(names[:-1] or names)), "dst": "203.0.113.5/32",
                       "gateway": "192.0.2.1"})
    if draw(st.booleans()):  # a management uplink in a policy-routing table
        routes.append({"dev": draw(st.sampled_from(names)), "dst": "default", "gateway": "198.51.100.1",
                       "table": 100})
        rules.append({"priority": 1000, "table": 100, "source": "198.51.100.0/24"})
    addresses = [{"dev": draw(st.sampled_from(names)), "address": draw(st.sampled_from(ADDRESS_POOL))}
                 for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):  # the admin's SSH session
        extra["sessions"] = [{"local": "192.0.2.10", "port": 22, "peer": draw(st.sampled_from(
            ["192.0.2.77", "198.51.100.7", "203.0.113.9"]))}]
    if draw(st.booleans()):  # VM disks on NFS
        extra["mounts"] = [{"fstype": "nfs4", "source": "192.0.2.50:/vz", "target": "/var/lib/vz",
                            "options": "rw,addr=192.0.2.50"}]
    guard = draw(st.sampled_from([{}, {}, {"management_interfaces": [draw(st.sampled_from(names))]},
                                  {"never_touch": ["8086:1521"]}, {"management_prefixes": ["10.0.0.0/8"]}]))
    topology = Topology.model_validate({"functions": functions, "links": links, "routes": routes, "rules": rules,
                                        "addresses": addresses, "root": root, **extra})
    return topology, guard


DEVICE = st.integers(0, 10_000)
FLAGS = st.fixed_dictionaries({"force": st.booleans(), "group": st.booleans()})
REQUESTS = st.one_of(
    st.tuples(st.just("bind"), DEVICE, st.sampled_from(["vfio-pci", ""]), FLAGS),
    st.tuples(st.just("unbind"), DEVICE),
    st.tuples(st.just("vfs"), DEVICE, st.integers(0, 3), st.sampled_from(["", "vfio-pci"]), st.booleans()),
    st.tuples(st.just("prepare"), st.integers(0, 1), st.lists(DEVICE, min_size=1, max_size=2)),
    st.tuples(st.just("release"), st.integers(0, 1)),
    st.tuples(st.just("forget"), DEVICE),
    # the host's network moves between requests: the default route, an address, a carrier
    st.tuples(st.just("route"), DEVICE, st.sampled_from(["192.0.2.1", "fe80::1", ""])),
    st.tuples(st.just("address"), DEVICE, st.sampled_from(ADDRESS_POOL)),
    st.tuples(st.just("carrier"), DEVICE, st.booleans()),
)
VMS = ["00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"]


def _candidates(snapshot) -> list[str]:
    addresses = sorted(snapshot.functions)
    return [*addresses, *(a[5:] for a in addresses), *sorted(snapshot.links), "garbage"]


def _move_network(sim, snapshot, request) -> None:
    kind, pick = request[0], request[1]
    names = sorted(snapshot.links)
    if not names:
        return
    name = names[pick % len(names)]
    if kind == "route":
        routes = [Route(dev=name, dst="default", gateway=request[2])] if request[2] else []
        sim.kernel.set_routes(routes)
    elif kind == "address":
        sim.kernel.set_addresses([Address(dev=name, address=request[2])])
    else:
        sim.kernel.set_carrier(name, request[2])


async def _scenario(sim_tools, root, topology, guard, requests) -> None:
    sim = sim_tools.attach_engine(sim_tools.build_kernel(root, topology),
                                  config=sim_tools.fast_config(**guard))
    engine = sim.engine
    for request in requests:
        snapshot = sysfs.read_snapshot(sim.paths)
        pick = _candidates(snapshot)
        kind = request[0]
        if kind in ("route", "address", "carrier"):
            _move_network(sim, snapshot, request)
            await asyncio.sleep(0)
            continue
        guarded = compute_protected(snapshot, sim.config.guard)
        forced = False
        if kind == "bind":
            forced = request[3]["force"]
            call = engine.bind(pick[request[1] % len(pick)], request[2], **request[3])
        elif kind == "unbind":
            call = engine.unbind(pick[request[1] % len(pick)])
        elif kind == "vfs":
            forced = request[4]
            call = engine.set_vf_count(pick[request[1] % len(pick)], request[2], driver=request[3], force=forced)
        elif kind == "prepare":
            call = engine.prepare(f"vm{request[1]}", VMS[request[1]], [pick[i % len(pick)] for i in request[2]])
        elif kind == "release":
            call = engine.release(VMS[request[1]])
        else:
            call = engine.forget(pick[request[1] % len(pick)], restore=True)
        # Without force nothing protected may change; with force, nothing on the management path.
        kept = [address for address, entry in guarded.entries.items() if not forced or entry.management]
        before = {address: sim.state(address) for address in kept}
        try:
            await call
            event(f"{kind}: done")
        except NicpassError as exc:
            event(f"{kind}: {exc.name}")
        event(f"protected functions before a request: {min(len(before), 3)}{'+' if len(before) >= 3 else ''}")
        event(f"reason kinds: {sorted({k for e in guarded.entries.values() for k in e.kinds})}")
        after = {address: sim.state(address) for address in before}
        # Nothing protected may be taken. Giving one back to its host driver (unbind, forget
        # --restore) after something else took it is allowed: that changes it toward the host.
        gives_back = kind in ("unbind", "forget") or (kind == "bind" and not request[2] and not request[3]["group"])
        changed = {address: (before[address], after[address]) for address in before if after[address] != before[address]}
        taken = {address: states for address, states in changed.items()
                 if not (gives_back and states[0][0] in ("", "vfio-pci", "pci-stub")
                         and states[1][0] not in ("", "vfio-pci", "pci-stub") and states[1][1] == ""
                         and states[1][2] == states[0][2])}
        assert taken == {}, f"{request} changed protected functions: {guarded.entries}"
        await asyncio.sleep(0)


@settings(settings.get_profile(PROFILE))
@given(host=hosts(), requests=st.lists(REQUESTS, min_size=1, max_size=8))
def test_no_request_changes_a_protected_function(sim_tools, host, requests):
    topology, guard = host
    root = sim_tools.fast_tmp_root()
    try:
        asyncio.run(_scenario(sim_tools, root, topology, guard, requests))
    finally:
        sim_tools.join_pending_kernel_writes()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("item", ["eth0", "8086", "0000:3b:00.9", "8086:15720"])
def test_never_touch_entries_that_could_match_nothing_are_configuration_errors(item):
    with pytest.raises(ValueError, match="neither a PCI address"):
        GuardSettings(never_touch=(item,))
    assert GuardSettings(never_touch=(" 3B:00.0 ", "8086:1572")).never_touch == ("3b:00.0", "8086:1572")
