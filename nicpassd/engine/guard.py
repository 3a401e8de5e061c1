"""The guard: which PCI functions the host cannot give away, and why.

The protected set is a pure function of a host snapshot and the configuration, recomputed on every
route, address, link or device event (``Engine.refresh``). It is built from:

- the management path: interfaces carrying a default route (IPv4, IPv6), a route into or toward a
  configured management prefix, or an address inside one; configured management interfaces; and,
  when no other way in is left, the last interface with a carrier and a routable address;
- resolved downward through bridges, bonds, teams, VLANs and macvlans (any depth) to the PCI
  functions underneath;
- the storage controller(s) under the root file system and configured never-touch devices;
- closed over: the PF of a protected VF, every non-bridge member of a protected function's IOMMU
  group.

Every entry carries its reasons, each with the chain of links that led to it. Entries on the
management path itself (and never-touch, root storage) are never overridable, not even with
``force``; entries derived by the closure (a PF of a protected VF that is not itself on the
management path, an IOMMU group mate) may be overridden by an authorized ``force``.

The one check every mutation passes: ``ProtectedSet.check(address, action, force=...)`` (also
``refuse_if_protected``), raising ``Protected`` with the reasons.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

from nicpassd.engine.config import GuardSettings
from nicpassd.errors import Protected
from nicpassd.host.model import HostSnapshot, IfAddress, Route
from nicpassd.host.routing import table_reason

# Kinds of reasons. Those in MANAGEMENT can never be overridden.
DEFAULT_ROUTE = "default-route"
MANAGEMENT_PREFIX = "management-prefix"
MANAGEMENT_INTERFACE = "management-interface"
LAST_WAY_IN = "last-way-in"
NEVER_TOUCH = "never-touch"
ROOT_STORAGE = "root-storage"
SESSION = "session"
NETWORK_STORAGE = "network-storage"
CLUSTER = "cluster"
PF_OF_VF = "pf-of-protected-vf"
PF_OF_MANAGEMENT_VF = "pf-of-management-vf"
IOMMU_GROUP = "iommu-group"
MANAGEMENT = frozenset({DEFAULT_ROUTE, MANAGEMENT_PREFIX, MANAGEMENT_INTERFACE, LAST_WAY_IN, NEVER_TOUCH,
                        ROOT_STORAGE, PF_OF_MANAGEMENT_VF, SESSION, NETWORK_STORAGE, CLUSTER})
SERVICES = {22: "SSH", 8006: "Proxmox web UI", 9090: "Cockpit"}
PCI_ADDRESS = re.compile(r"^(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@dataclass(frozen=True)
class Protection:
    address: str
    reasons: tuple[str, ...]
    management: bool  # on the management path itself (never overridable)
    kinds: frozenset[str] = frozenset()
    present: bool = True  # an inventoried function (False: e.g. a root disk controller in a group of its own)

    @property
    def overridable(self) -> bool:
        return not self.management


@dataclass
class ProtectedSet:
    entries: dict[str, Protection] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # configuration that matched nothing, for `Check`

    def __contains__(self, address: str) -> bool:
        return address in self.entries

    def reasons(self, address: str) -> tuple[str, ...]:
        entry = self.entries.get(address)
        return entry.reasons if entry else ()

    def check(self, address: str, action: str, *, force: bool = False) -> Protection | None:
        """The guard's verdict on ``action`` (e.g. "bind 0000:01:00.0 (eno1) to vfio-pci").

        Returns None when ``address`` is not protected, the entry when ``force`` overrides it
        (the caller must log that, with who asked); raises ``Protected`` otherwise.
        """
        entry = self.entries.get(address)
        if entry is None:
            return None
        if entry.overridable:
            if force:
                return entry
            raise Protected(f"refusing to {action}: it is protected ({'; '.join(entry.reasons)})",
                            "choose another device, or override with force (`--force`) if you are sure")
        raise Protected(f"refusing to {action}{' even with force' if force else ''}: it is protected "
                        f"({'; '.join(entry.reasons)})",
                        "choose a device off the host's management path, or change the host's network first")


def refuse_if_protected(protected: ProtectedSet, address: str, action: str, *, force: bool = False) -> Protection | None:
    """``ProtectedSet.check``: raises ``Protected`` unless ``address`` is free (or ``force`` overrides it)."""
    return protected.check(address, action, force=force)


class _Builder:
    def __init__(self, snapshot: HostSnapshot, *, tunnels: bool = True) -> None:
        self.snapshot = snapshot
        self.follow_tunnels = tunnels
        self.reasons: dict[str, list[str]] = {}
        self.kinds: dict[str, set[str]] = {}
        self.notes: list[str] = []

    def add(self, address: str, reason: str, kind: str) -> bool:
        """Record a reason; True when it is new (so the closure walks on from it)."""
        reasons = self.reasons.setdefault(address, [])
        self.kinds.setdefault(address, set()).add(kind)
        if reason in reasons:
            return False
        reasons.append(reason)
        return True

    def management(self, address: str) -> bool:
        return bool(self.kinds.get(address, set()) & MANAGEMENT)

    def protect_interface(self, name: str, why: str, kind: str) -> bool:
        """Walk from an interface down its lower devices to the PCI functions underneath."""
        stack = [(name, [name])]
        seen: set[str] = set()
        found = False
        while stack:
            current, chain = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            link = self.snapshot.links.get(current)
            if link is None:
                continue
            if link.device:
                self.add(link.device, f"{why}: {' → '.join(chain)}", kind)
                found = True
            for lower in reversed(link.lowers):
                stack.append((lower, [*chain, lower]))
            tunnel = self.snapshot.tunnels.get(current) if self.follow_tunnels else None
            if tunnel is not None:
                for underlay, what in self.underlays(tunnel):
                    stack.append((underlay, [*chain, f"{underlay} ({what})"]))
        return found

    def underlays(self, tunnel) -> list[tuple[str, str]]:
        """(interface, why) a tunnel rides on: its lower device, else the route to each remote."""
        if tunnel.dev:
            return [(tunnel.dev, f"{tunnel.kind} {tunnel.name}'s lower device")]
        found = []
        for remote in tunnel.remotes:
            route = route_to(self.snapshot, remote, tunnel.local)
            if route is not None and route.dev not in (tunnel.name, "lo"):
                found.append((route.dev, f"{tunnel.kind} underlay to {remote}"))
        return found


@functools.lru_cache(maxsize=16384)
def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parsed once: the same prefixes come back on every refresh (and for every session)."""
    return ipaddress.ip_network(text, strict=False)


@functools.lru_cache(maxsize=16384)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parsed once: a refresh sees the same addresses again and again (1,000 parses cost ~5 ms)."""
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=16384)
def _reaches_host(address: IfAddress) -> bool:
    """``IfAddress.reaches_host`` with the parse cached: not loopback, not link-local."""
    ip = _ip(address.ip)
    return address.scope < 253 and not (ip.is_loopback or ip.is_link_local)


def _family(version: int) -> str:
    return "IPv4" if version == 4 else "IPv6"


def _route_text(route: Route, rules: tuple = ()) -> str:
    via = f" via {route.gateway}" if route.gateway else ""
    where = table_reason(route, rules)
    if route.is_default:
        return f"{_family(route.family)} default route {route.prefix}{via}{where}"
    return f"route {route.prefix}{via}{where}"


class Held(Protocol):
    """A function the management path had and the live state no longer shows (guard_memory.py)."""

    reasons: tuple[str, ...]
    entry: "object"  # .kinds: the kinds of reasons it was protected for


# live management path (address -> reasons, kinds) -> the remembered functions still to protect
Remember = Callable[[dict[str, tuple[tuple[str, ...], frozenset[str]]]], dict[str, Held]]


def compute_protected(snapshot: HostSnapshot, settings: GuardSettings, remember: Remember | None = None) -> ProtectedSet:
    """The protected set of ``snapshot``. ``remember`` (``GuardMemory.observe``) is told the live
    management path before the closure and answers with the functions that were on it and are
    taken now: they are protected as management, their PF and group mates with them."""
    builder = _Builder(snapshot, tunnels=settings.tunnels)
    for route in snapshot.routes:
        if route.is_default:
            builder.protect_interface(route.dev, _route_text(route, snapshot.rules), DEFAULT_ROUTE)
    _management_prefixes(builder, settings)
    if settings.sessions:
        _sessions(builder, settings)
    if settings.storage:
        for item in snapshot.network_storage:
            route = route_to(snapshot, item.server)
            if route is not None and route.dev != "lo":
                builder.protect_interface(route.dev, f"{item.kind} server {item.server} of {item.what}",
                                          NETWORK_STORAGE)
    for name in settings.management_interfaces:
        if not builder.protect_interface(name, "configured management interface", MANAGEMENT_INTERFACE):
            if name not in snapshot.links:
                builder.notes.append(f"configured management interface {name} does not exist")
            else:
                builder.notes.append(f"configured management interface {name} has no PCI function beneath it")
    for item in settings.never_touch:
        matched = False
        for function in snapshot.functions.values():
            if item.lower() in (function.address, function.address[5:], f"{function.vendor_id}:{function.device_id}"):
                builder.add(function.address, f"configured never_touch ({item})", NEVER_TOUCH)
                matched = True
        if not matched and PCI_ADDRESS.match(item.lower()):
            absent = item.lower() if len(item) > 7 else f"0000:{item.lower()}"  # reported, though not inventoried
            builder.add(absent, f"configured never_touch ({item})", NEVER_TOUCH)
    for storage in snapshot.root_storage:
        builder.add(storage.address, f"storage of the root file system: {' → '.join(storage.chain)} → {storage.address}",
                    ROOT_STORAGE)
    _last_way_in(builder)
    if remember is not None:
        live = {address: (tuple(reasons), frozenset(builder.kinds[address]))
                for address, reasons in builder.reasons.items() if builder.management(address)}
        for address, held in remember(live).items():
            kinds = [kind for kind in held.entry.kinds if kind in MANAGEMENT] or [MANAGEMENT_INTERFACE]
            for reason in held.reasons:
                builder.add(address, reason, kinds[0])
            builder.kinds[address].update(kinds)
    _close_over_pf_and_groups(builder)
    return ProtectedSet({
        address: Protection(address, tuple(reasons), builder.management(address), frozenset(builder.kinds[address]),
                            address in snapshot.functions)
        for address, reasons in builder.reasons.items()
    }, tuple(builder.notes))


def route_to(snapshot: HostSnapshot, destination: str, source: str = "") -> Route | None:
    """The route the kernel would send ``destination`` by (from ``source``): the rules in order
    (a "from PREFIX" rule when ``source`` is in it), the longest prefix of the table each looks up."""
    target = _ip(destination)
    origin = _ip(source) if source else None
    tables: list[int] = []
    for rule in sorted(snapshot.rules, key=lambda r: r.priority):
        if rule.family != target.version or rule.l3mdev or rule.table in tables:
            continue
        if rule.selector.startswith("from ") and " " not in rule.selector[5:]:
            if origin is None or origin not in _net(rule.selector[5:]):
                continue
        elif rule.selector:
            continue  # iif/oif/fwmark selectors: not for an answer leaving the host
        tables.append(rule.table)
    if not snapshot.rules:
        tables = [254]
    by_table = _routes_by_table(snapshot.routes)
    for table in tables:
        for route, network in by_table.get((table, target.version), ()):
            if target in network:
                return route  # longest prefix first
    return None


@functools.lru_cache(maxsize=4)
def _parsed_addresses(addresses: tuple[IfAddress, ...]) -> dict[int, list[tuple[IfAddress, int]]]:
    """version -> [(address, its IP as an int)]: parsed once per set of addresses, which every
    management prefix of a refresh is matched against."""
    parsed: dict[int, list[tuple[IfAddress, int]]] = {}
    for address in addresses:
        parsed.setdefault(address.family, []).append((address, int(_ip(address.ip))))
    return parsed


@functools.lru_cache(maxsize=4)
def _routes_by_table(routes: tuple[Route, ...]) -> dict[tuple[int, int], list]:
    """(table, family) -> [(route, network)], the longest prefixes first: built once per set of
    routes, which every session, storage server and tunnel of a refresh looks up."""
    grouped: dict[tuple[int, int], list] = {}
    for route in routes:
        grouped.setdefault((route.table, route.family), []).append((route, _net(route.prefix)))
    for entries in grouped.values():
        entries.sort(key=lambda item: -item[1].prefixlen)
    return grouped


def _sessions(builder: _Builder, settings: GuardSettings) -> None:
    """The admin's own way in: an established session to an SSH or web console port arrives on
    the interface the answer leaves by (the route back to its peer)."""
    snapshot = builder.snapshot
    for session in snapshot.sessions:
        if session.local_port not in settings.session_ports:
            continue
        if _ip(session.peer).is_loopback:
            continue
        route = route_to(snapshot, session.peer, session.local)
        if route is None or route.dev == "lo":
            continue
        service = SERVICES.get(session.local_port, f"TCP port {session.local_port}")
        builder.protect_interface(route.dev, f"{service} session from {session.peer}", SESSION)


def _management_prefixes(builder: _Builder, settings: GuardSettings) -> None:
    """Routes inside a management prefix, the most specific routes that carry traffic to it, and
    addresses inside it: the configured prefixes, and (``cluster``) the cluster's links."""
    prefixes = [(text, f"management prefix {ipaddress.ip_network(text)}", MANAGEMENT_PREFIX)
                for text in settings.management_prefixes]
    if settings.cluster:
        prefixes += [(item.prefix, item.reason, CLUSTER) for item in builder.snapshot.cluster]
    for text, what, kind in prefixes:
        _protect_prefix(builder, ipaddress.ip_network(text), what, kind)


def _protect_prefix(builder: _Builder, prefix, what: str, kind: str) -> None:
    snapshot = builder.snapshot
    routes = [(route, _net(route.prefix)) for route in snapshot.routes]
    inside = [(route, net) for route, net in routes if net.version == prefix.version and net.subnet_of(prefix)]
    for route, _network in inside:
        builder.protect_interface(route.dev, f"{_route_text(route)} in {what}", kind)
    covering = [(route, net) for route, net in routes
                if net.version == prefix.version and prefix.subnet_of(net) and net != prefix]
    if covering:
        longest = max(network.prefixlen for _route, network in covering)
        for route, net in covering:
            if net.prefixlen == longest:
                builder.protect_interface(route.dev, f"{_route_text(route)} carries {what}", kind)
    mask, network = int(prefix.netmask), int(prefix.network_address)
    for address, value in _parsed_addresses(snapshot.addresses).get(prefix.version, ()):
        if value & mask == network:
            builder.protect_interface(address.dev, f"address {address.address} in {what}", kind)


def _last_way_in(builder: _Builder) -> None:
    """A host must keep a way in: when every interface that has a carrier and a routable address
    depends on the same PCI function(s), those are protected, default route or not.

    ``critical(I)`` is the set of functions whose loss takes interface I down: a physical
    interface depends on its function, a bond or bridge on what all its live lowers share, a VLAN
    or macvlan on its lower. A function is the last way in when every way in depends on it.
    """
    snapshot = builder.snapshot
    links = snapshot.links
    memo: dict[str, frozenset[str] | None] = {}

    def critical(name: str, seen: frozenset[str] = frozenset()) -> frozenset[str] | None:
        if name in memo:
            return memo[name]
        link = links.get(name)
        result: frozenset[str] | None = None
        if link is not None and name not in seen:
            if link.device:
                result = frozenset([link.device]) if link.carrier else None
            else:
                alive = [c for c in (critical(lower, seen | {name}) for lower in link.lowers) if c is not None]
                result = frozenset.intersection(*alive) if alive else None
        memo[name] = result
        return result

    addressed: dict[str, list[str]] = {}
    for address in snapshot.addresses:
        if _reaches_host(address):
            addressed.setdefault(address.dev, []).append(address.address)
    ways = {}
    for name in sorted(addressed):
        link = links.get(name)
        if link is None or not link.carrier:
            continue
        needs = critical(name)
        if needs is not None:
            ways[name] = needs
    if not ways:
        return
    last = frozenset.intersection(*ways.values())
    for address in sorted(last):
        for way in ways:
            chain = _chain_to(snapshot, way, address)
            reason = (f"last way into the host (no other interface has a carrier and an address): "
                      f"{way} {', '.join(addressed[way])}: {' → '.join(chain)}")
            builder.add(address, reason, LAST_WAY_IN)


def _chain_to(snapshot: HostSnapshot, top: str, address: str) -> list[str]:
    stack = [(top, [top])]
    while stack:
        name, chain = stack.pop()
        link = snapshot.links.get(name)
        if link is None:
            continue
        if link.device == address:
            return chain
        stack.extend((lower, [*chain, lower]) for lower in link.lowers if lower not in chain)
    return [top]


def _close_over_pf_and_groups(builder: _Builder) -> None:
    snapshot = builder.snapshot
    group_of = {member: number for number, members in snapshot.groups.items() for member in members}
    pending = list(builder.reasons)
    while pending:
        address = pending.pop()
        function = snapshot.functions.get(address)
        if function is not None and function.physfn:
            # A PF carries its VFs: changing its VF count or driver resets the protected VF, so it
            # is on the management path exactly when that VF is.
            # (Every management reason is in before the closure starts, so a VF's status is final.)
            kind = PF_OF_MANAGEMENT_VF if builder.management(address) else PF_OF_VF
            if builder.add(function.physfn, f"PF of protected VF {address} (changing its VFs resets them)", kind):
                pending.append(function.physfn)
        group = function.iommu_group if function is not None else group_of.get(address, -1)
        if group < 0 or builder.kinds[address] == {IOMMU_GROUP}:
            continue  # protected only as a mate: whoever protected it covered the whole group
        for mate in snapshot.groups.get(group, ()):
            if mate == address:
                continue
            mate_function = snapshot.functions.get(mate)
            if mate_function is not None and mate_function.is_bridge:
                continue
            if builder.add(mate, f"shares IOMMU group {group} with protected {address}", IOMMU_GROUP):
                pending.append(mate)
