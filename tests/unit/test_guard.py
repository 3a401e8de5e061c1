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
from nicpassd.errors import NicpassError
from nicpassd.host import sysfs
from nicpassd.sim.topology import Route, Topology

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


A, B, C = "0000:10:00.0", "0000:11:00.0", "0000:12:00.0"
NICS = nic(A, "eno1") + nic(B, "eno2", device="1521") + nic(C, "enp3")


def protected(make_kernel, toml: str, **guard: object) -> dict[str, tuple[str, ...]]:
    sim = make_kernel(toml)
    result = compute_protected(sim.snapshot(), GuardSettings(**guard))
    return {address: entry.reasons for address, entry in result.entries.items()}


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


# ---------------------------------------------------------------- property: guard holds
@st.composite
def hosts(draw) -> tuple[Topology, dict]:
    functions, names = [], []
    for i in range(draw(st.integers(1, 4))):
        fn = {"address": f"0000:{0x10 + i:02x}:00.0", "vendor": "8086",
              "device": draw(st.sampled_from(["1572", "1521"])), "driver": "i40e",
              "netdev": f"nic{i}", "mac": f"02:00:00:00:{i:02x}:00"}
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
    routes = []
    dev = draw(st.sampled_from([None, *names]))
    if dev is not None:
        gateway = draw(st.sampled_from(["192.0.2.1", "fe80::1"]))
        routes.append({"dev": dev, "dst": "default", "gateway": gateway})
    guard = draw(st.sampled_from([{}, {}, {"management_interfaces": [draw(st.sampled_from(names))]},
                                  {"never_touch": ["8086:1521"]}]))
    return Topology.model_validate({"functions": functions, "links": links, "routes": routes}), guard


DEVICE = st.integers(0, 10_000)
REQUESTS = st.one_of(
    st.tuples(st.just("bind"), DEVICE, st.sampled_from(["vfio-pci", ""])),
    st.tuples(st.just("unbind"), DEVICE),
    st.tuples(st.just("vfs"), DEVICE, st.integers(0, 3), st.sampled_from(["", "vfio-pci"])),
    st.tuples(st.just("prepare"), st.integers(0, 1), st.lists(DEVICE, min_size=1, max_size=2)),
    st.tuples(st.just("release"), st.integers(0, 1)),
    st.tuples(st.just("forget"), DEVICE),
    st.tuples(st.just("route"), DEVICE, st.sampled_from(["192.0.2.1", "fe80::1"])),  # the host's network moves
)
VMS = ["00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"]


def _candidates(snapshot) -> list[str]:
    addresses = sorted(snapshot.functions)
    return [*addresses, *(a[5:] for a in addresses), *sorted(snapshot.links), "garbage"]


async def _scenario(sim_tools, root, topology, guard, requests) -> None:
    sim = sim_tools.attach_engine(sim_tools.build_kernel(root, topology),
                                  config=sim_tools.fast_config(**guard))
    engine = sim.engine
    for request in requests:
        snapshot = sysfs.read_snapshot(sim.paths)
        pick = _candidates(snapshot)
        kind = request[0]
        if kind == "route":
            names = sorted(snapshot.links)
            sim.kernel.set_routes([Route(dev=names[request[1] % len(names)], dst="default", gateway=request[2])])
            await asyncio.sleep(0)
            continue
        guarded = compute_protected(snapshot, sim.config.guard)
        before = {address: sim.state(address) for address in guarded.entries}
        if kind == "bind":
            call = engine.bind(pick[request[1] % len(pick)], request[2])
        elif kind == "unbind":
            call = engine.unbind(pick[request[1] % len(pick)])
        elif kind == "vfs":
            call = engine.set_vf_count(pick[request[1] % len(pick)], request[2], driver=request[3])
        elif kind == "prepare":
            call = engine.prepare(f"vm{request[1]}", VMS[request[1]], [pick[i % len(pick)] for i in request[2]])
        elif kind == "release":
            call = engine.release(VMS[request[1]])
        else:
            call = engine.forget(pick[request[1] % len(pick)], restore=True)
        try:
            await call
            event(f"{kind}: done")
        except NicpassError as exc:
            event(f"{kind}: {exc.name}")
        event(f"protected functions before a request: {min(len(before), 3)}{'+' if len(before) >= 3 else ''}")
        after = {address: sim.state(address) for address in before}
        assert after == before, f"{request} changed protected functions: {guarded.entries}"
        await asyncio.sleep(0)


@settings(settings.get_profile(PROFILE))
@given(host=hosts(), requests=st.lists(REQUESTS, min_size=1, max_size=6))
def test_no_request_changes_a_protected_function(sim_tools, host, requests):
    topology, guard = host
    root = sim_tools.fast_tmp_root()
    try:
        asyncio.run(_scenario(sim_tools, root, topology, guard, requests))
    finally:
        sim_tools.join_pending_kernel_writes()
        shutil.rmtree(root, ignore_errors=True)
