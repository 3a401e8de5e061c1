"""The guard: which PCI functions the host cannot give away, and why.

The protected set is a pure function of a host snapshot and the configuration. It starts from the
management path (interfaces with a default route, configured interfaces and prefixes), walks down
through bridges, bonds, VLANs and macvlans to the PCI functions underneath, then adds the PF of
every protected VF and every member of a protected function's IOMMU group.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from nicpassd.engine.config import GuardSettings
from nicpassd.errors import Protected
from nicpassd.host.model import HostSnapshot


@dataclass(frozen=True)
class Protection:
    address: str
    reasons: tuple[str, ...]
    management: bool  # on the management path itself (never overridable)


@dataclass
class ProtectedSet:
    entries: dict[str, Protection] = field(default_factory=dict)

    def __contains__(self, address: str) -> bool:
        return address in self.entries

    def reasons(self, address: str) -> tuple[str, ...]:
        entry = self.entries.get(address)
        return entry.reasons if entry else ()


class _Builder:
    def __init__(self, snapshot: HostSnapshot) -> None:
        self.snapshot = snapshot
        self.reasons: dict[str, list[str]] = {}
        self.management: set[str] = set()

    def add(self, address: str, reason: str, *, management: bool = False) -> bool:
        reasons = self.reasons.setdefault(address, [])
        if management:
            self.management.add(address)
        if reason in reasons:
            return False
        reasons.append(reason)
        return True

    def protect_interface(self, name: str, why: str) -> None:
        """Walk from an interface down its lower devices to the PCI functions underneath."""
        stack = [(name, [name])]
        seen: set[str] = set()
        while stack:
            current, chain = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            link = self.snapshot.links.get(current)
            if link is None:
                continue
            if link.device:
                self.add(link.device, f"{why}: {' → '.join(chain)}", management=True)
            for lower in link.lowers:
                stack.append((lower, [*chain, lower]))


def _route_reason(route) -> str:
    family = "IPv4" if route.family == 4 else "IPv6"
    via = f" via {route.gateway}" if route.gateway else ""
    return f"{family} default route {route.prefix}{via}"


def compute_protected(snapshot: HostSnapshot, settings: GuardSettings) -> ProtectedSet:
    builder = _Builder(snapshot)
    for route in snapshot.routes:
        if route.is_default:
            builder.protect_interface(route.dev, _route_reason(route))
    prefixes = [ipaddress.ip_network(prefix) for prefix in settings.management_prefixes]
    for route in snapshot.routes:
        network = ipaddress.ip_network(route.prefix)
        for prefix in prefixes:
            if network.version == prefix.version and network.overlaps(prefix):
                builder.protect_interface(route.dev, f"route {route.prefix} in management prefix {prefix}")
    for name in settings.management_interfaces:
        builder.protect_interface(name, "configured management interface")
    for item in settings.never_touch:
        for function in snapshot.functions.values():
            if item.lower() in (function.address, function.address[5:], f"{function.vendor_id}:{function.device_id}"):
                builder.add(function.address, f"configured never_touch ({item})", management=True)
    _close_over_pf_and_groups(builder)
    return ProtectedSet({
        address: Protection(address, tuple(reasons), address in builder.management)
        for address, reasons in builder.reasons.items()
    })


def _close_over_pf_and_groups(builder: _Builder) -> None:
    snapshot = builder.snapshot
    pending = list(builder.reasons)
    while pending:
        address = pending.pop()
        function = snapshot.functions.get(address)
        if function is None:
            continue
        if function.physfn:
            if builder.add(function.physfn, f"PF of protected VF {address} (changing its VFs resets them)"):
                pending.append(function.physfn)
        for mate in snapshot.group_members(address):
            if mate == address:
                continue
            mate_function = snapshot.functions.get(mate)
            if mate_function is not None and mate_function.is_bridge:
                continue
            reason = f"shares IOMMU group {function.iommu_group} with protected {address}"
            if builder.add(mate, reason):
                pending.append(mate)


def refuse_if_protected(protected: ProtectedSet, address: str, action: str) -> None:
    """``action`` names the refused request, e.g. "bind 0000:01:00.0 (eno1) to vfio-pci"."""
    entry = protected.entries.get(address)
    if entry is None:
        return
    raise Protected(
        f"refusing to {action}: it is protected ({'; '.join(entry.reasons)})",
        "choose a device off the host's management path, or change the host's network first",
    )
