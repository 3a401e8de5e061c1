"""The recorder: reads a host's /sys and /proc (under a ``HostPaths`` root) into a ``Topology``.

Read-only by construction: it only opens, lists and readlinks files under ``paths.root``; it
never writes there, opens no socket and runs no command. The result is what the simulated kernel
would need to boot a host that looks like this one *after a reboot*: the simulator has no
persistent state, so run-time state (VFs, driver_override, vfio-pci bindings) is not recorded.

What sysfs cannot tell, and what is done about it, is said where it happens; items that cannot
be represented are dropped with a note (stderr, and comment lines in a TOML file).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from nicpassd.host.platform import read_function_platform, read_platform
from nicpassd.host.sysfs import read_groups, read_routing, read_serial
from nicpassd.paths import HostPaths
from nicpassd.sim.topology import Address, Function, Link, Route, Topology, dump_topology_json
from nicpassd.sim.topology import Mount
from nicpassd.sim.topology import Rule as RuleSpec
from nicpassd.host.storage import NETWORK_FILESYSTEMS, read_block_transports
from nicpassd.host.tunnels import read_tunnels

TUNNEL_KINDS = frozenset({"wireguard", "vxlan", "geneve", "gre", "ipip", "vti"})

# Drivers that only hold a function for a guest: they say nothing about the host driver.
STUB_DRIVERS = frozenset({"vfio-pci", "pci-stub"})
DEVTYPE_KINDS = frozenset({"bond", "bridge", "vlan", "macvlan", "team", "dummy"})
STACKED_ON_ONE = frozenset({"vlan", "macvlan"})  # meaningless without their single lower device
ARPHRD_LOOPBACK = "772"
IFA_F_TEMPORARY = 0x01
IPV6_SCOPE_HOST, IPV6_SCOPE_LINK = 0x10, 0x20


class RecorderError(Exception):
    pass


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # absent, unreadable, or an attribute the kernel refuses (carrier when down)
        return ""


def _link_name(path: Path) -> str:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _hex(path: Path, width: int) -> str:
    return _read(path).lower().removeprefix("0x").rjust(width, "0")


class _Recorder:
    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.notes: list[str] = []
        self._aliases: list[tuple[str, str]] | None = None

    # ------------------------------------------------------------ host drivers
    def _modules_alias(self) -> list[tuple[str, str]]:
        """The ``pci:`` aliases of modules.alias for the recorded kernel (empty when absent)."""
        if self._aliases is None:
            release = _read(self.paths.under("/proc/sys/kernel/osrelease"))
            text = _read(self.paths.under(f"/lib/modules/{release}/modules.alias")) if release else ""
            self._aliases = [
                (fields[1], fields[2]) for fields in (line.split() for line in text.splitlines())
                if len(fields) == 3 and fields[0] == "alias" and fields[1].startswith("pci:")
            ]
        return self._aliases

    def _driver_for(self, vendor: str, device: str, subvendor: str, subdevice: str, cls: str) -> str:
        """The driver the kernel would probe for these IDs, from modules.alias; "" when unknown.

        Built-in drivers are not in modules.alias, so this finds modular drivers only.
        """
        vendor, device, subvendor, subdevice, cls = (v.upper() for v in (vendor, device, subvendor, subdevice, cls))
        modalias = f"pci:v0000{vendor}d0000{device}sv0000{subvendor}sd0000{subdevice}bc{cls[:2]}sc{cls[2:4]}i{cls[4:]}"
        matches = [(pattern, module) for pattern, module in self._modules_alias()
                   if fnmatch.fnmatchcase(modalias, pattern)]
        if not matches:
            return ""
        # Several may match (a device ID entry and a class wildcard): the most specific wins.
        module = max(matches, key=lambda match: len(match[0].replace("*", "")))[1]
        # The PCI driver's name may differ from its module's (virtio_pci registers virtio-pci).
        drivers = _listdir(self.paths.under(f"/sys/module/{module}/drivers"))
        registered = [entry.removeprefix("pci:") for entry in drivers if entry.startswith("pci:")]
        return registered[0] if registered else module

    def _ids(self, base: Path) -> tuple[str, str, str, str, str]:
        return (_hex(base / "vendor", 4), _hex(base / "device", 4), _hex(base / "subsystem_vendor", 4),
                _hex(base / "subsystem_device", 4), _hex(base / "class", 6))

    # -------------------------------------------------------------- functions
    def functions(self) -> list[Function]:
        pci = self.paths.pci_devices
        if not pci.is_dir():
            raise RecorderError(f"{pci} does not exist (is the root directory right?)")
        addresses = _listdir(pci)
        physfn = {address: _link_name(pci / address / "physfn") for address in addresses}
        network = [a for a in addresses if _hex(pci / a / "class", 6).startswith("02")]
        # A VF is not recorded: the simulation creates VFs through sriov_numvfs. Its PF is.
        wanted = {physfn[a] or a for a in network}
        groups = read_groups(self.paths)
        for members in groups.values():
            if wanted.intersection(members):
                wanted.update(members)
        vfs = {a for a in (*network, *wanted) if physfn.get(a)}
        if vfs:
            self.notes.append(f"{len(vfs)} VFs not recorded: the simulated host boots with sriov_numvfs 0")
        recorded = []
        for address in sorted(wanted - vfs):
            try:
                recorded.append(self.function(address))
            except ValidationError as exc:  # e.g. a 5-digit VMD domain the schema does not take
                self.notes.append(f"function {address} not recorded: {exc.errors()[0]['msg']}")
        return recorded

    def function(self, address: str) -> Function:
        base = self.paths.pci_device(address)
        vendor, device, subvendor, subdevice, cls = self._ids(base)
        current = _link_name(base / "driver")
        fields: dict = {
            "address": address, "vendor": vendor, "device": device, "subsystem_vendor": subvendor,
            "subsystem_device": subdevice, "class": cls, "serial": read_serial(base / "config"),
        }
        group = _link_name(base / "iommu_group")
        if group.isdigit():
            fields["iommu_group"] = int(group)
        # ``driver`` is the host driver the kernel probes at boot. A function held by vfio-pci or
        # pci-stub hides it: look it up in modules.alias like the kernel's modprobe would, and
        # boot it bound to that driver, as a real reboot would (driver_override does not survive
        # one). Left "" when unknown: the function then boots unbound, which is what it looks
        # like from the host, rather than on vfio-pci, whose release would re-probe vfio-pci.
        if current and current not in STUB_DRIVERS:
            fields["driver"] = current
        else:
            fields["driver"] = self._driver_for(vendor, device, subvendor, subdevice, cls)
            if fields["driver"] and not current:  # unbound on this host: an admin's unbind
                fields["bound"] = False
            if not fields["driver"]:
                self.notes.append(f"function {address}: host driver unknown (on {current or 'no driver'}"
                                  " and not in modules.alias); it boots unbound")
        netdev = self._netdev_dir(base)
        if netdev is not None:
            fields["netdev"] = netdev.name
            if _read(netdev / "addr_assign_type") == "0":  # permanent: the NIC's own MAC
                fields["mac"] = _read(netdev / "address")
            # carrier cannot be read while the interface is down (the simulator's carrier means
            # "up, with a link"); otherwise only a reported "0" means no carrier.
            flags = _read(netdev / "flags")
            up = not flags.startswith("0x") or bool(int(flags, 16) & 0x1)  # IFF_UP
            fields["carrier"] = up and _read(netdev / "carrier") != "0"
        total = int(_read(base / "sriov_totalvfs") or 0)
        if total:
            fields.update(self._sriov(address, base, total, fields))
        machine = read_function_platform(self.paths, address)
        fields["reset_method"] = " ".join(m for m in machine.reset_methods if m != "unknown") or (
            "flr" if machine.reset_methods else "")  # a kernel before 5.15: resettable, the method unknown
        fields["sriov_disabled"] = bool(machine.sriov_capability) and not total
        fields["vf_bars_unassigned"] = machine.vf_memory is False
        return Function.model_validate(fields)

    def _netdev_dir(self, base: Path) -> Path | None:
        """The first interface of the function. A virtio-net function has it one level down
        (``virtioN/net/``): the simulator only puts netdevs on the PCI function itself, so it is
        recorded there — the function, which is what the guard protects, keeps its interface."""
        for net in (base / "net", *(base / entry / "net" for entry in _listdir(base) if entry.startswith("virtio"))):
            names = _listdir(net)
            if names:
                if len(names) > 1:
                    self.notes.append(f"{base.name}: only {names[0]} recorded of its interfaces {', '.join(names)}")
                return net / names[0]
        return None

    def _sriov(self, address: str, base: Path, total: int, fields: dict) -> dict:
        # sriov_numvfs (the current count) has no place in the schema on purpose: see functions().
        existing = [base / entry for entry in _listdir(base) if entry.startswith("virtfn")]
        vf_device = _hex(base / "sriov_vf_device", 4) if (base / "sriov_vf_device").exists() else ""
        if not vf_device and existing:  # kernels before 4.20 have no sriov_vf_device
            vf_device = _hex(existing[0] / "device", 4)
        if not vf_device:
            self.notes.append(f"function {address}: SR-IOV not recorded (VF device ID unknown)")
            return {}
        # The VF driver: what an existing VF is bound to, else what modules.alias gives for the
        # VF's IDs (a VF reports its PF's subsystem IDs as far as driver matching goes).
        vf_driver = next((d for d in (_link_name(vf / "driver") for vf in existing) if d and d not in STUB_DRIVERS), "")
        if not vf_driver:
            vf_driver = self._driver_for(fields["vendor"], vf_device, fields["subsystem_vendor"],
                                         fields["subsystem_device"], fields["class"])
        if not vf_driver:
            self.notes.append(f"function {address}: VF driver unknown (no VF bound to one, not in "
                              "modules.alias); simulated VFs bind no driver")
        return {
            "sriov_totalvfs": total, "vf_device": vf_device, "vf_driver": vf_driver,
            "vf_offset": int(_read(base / "sriov_offset") or 1), "vf_stride": int(_read(base / "sriov_stride") or 1),
        }

    # ------------------------------------------------------------------ links
    def links(self, netdevs: set[str]) -> list[Link]:
        candidates: dict[str, tuple[str, list[str]]] = {}
        skipped: list[str] = []
        self._tunnels = {name: tunnel for name, tunnel in read_tunnels(self.paths).items() if tunnel.kind in TUNNEL_KINDS}
        for name in _listdir(self.paths.class_net):
            net_dir = self.paths.class_net / name
            if name in netdevs:
                continue
            if (net_dir / "device").exists() or name == "lo" or _read(net_dir / "type") == ARPHRD_LOOPBACK:
                if name != "lo":
                    skipped.append(name)  # a VF's, USB or other non-recorded device's interface
                continue
            entries = _listdir(net_dir)
            lowers = [entry.removeprefix("lower_") for entry in entries if entry.startswith("lower_")]
            kind = self._tunnels[name].kind if name in self._tunnels else self._kind(net_dir, lowers)
            if kind:
                candidates[name] = (kind, lowers)
            else:
                skipped.append(name)
        if skipped:
            self.notes.append(f"interfaces not recorded (not on a recorded function, or a kind the "
                              f"simulator has not: veth, tun, ifb, dummy without DEVTYPE...): {', '.join(skipped)}")
        # vlan/macvlan need their lower device; a bond or bridge keeps its recorded ports (a
        # bridge of tap/veth ports and one NIC still protects that NIC's route). To a fixed point.
        changed = True
        while changed:
            changed = False
            known = netdevs | set(candidates)
            for name, (kind, lowers) in list(candidates.items()):
                kept = [lower for lower in lowers if lower in known]
                if kept == lowers:
                    continue
                changed = True
                if kind in STACKED_ON_ONE:
                    del candidates[name]
                    self.notes.append(f"{kind} {name} not recorded: its lower {', '.join(lowers)} is not")
                else:
                    candidates[name] = (kind, kept)
                    self.notes.append(f"{kind} {name}: lower {', '.join(sorted(set(lowers) - set(kept)))} not recorded")
        return [self._link(name, kind, lowers) for name, (kind, lowers) in self._lowers_first(candidates)]

    @staticmethod
    def _kind(net_dir: Path, lowers: list[str]) -> str:
        devtype = ""
        for line in _read(net_dir / "uevent").splitlines():
            if line.startswith("DEVTYPE="):
                devtype = line.removeprefix("DEVTYPE=")
        if devtype:  # bond, bridge, vlan set one; so do tun, wireguard, vxlan... (not ours)
            return devtype if devtype in DEVTYPE_KINDS else ""
        if (net_dir / "bridge").is_dir():
            return "bridge"
        if (net_dir / "bonding").is_dir():
            return "bond"
        if lowers:
            # No DEVTYPE but stacked: a master of its lowers (their ``master`` link points here)
            # is a team; otherwise a macvlan (or ipvlan/macvtap: the stacking is what matters).
            master = _link_name(net_dir.parent / lowers[0] / "master")
            return "team" if master == net_dir.name else "macvlan"
        return ""  # dummy, ifb, veth... are indistinguishable in sysfs

    def _link(self, name: str, kind: str, lowers: list[str]) -> Link:
        fields: dict = {"name": name, "kind": kind, "lowers": sorted(lowers),
                        "mac": _read(self.paths.class_net / name / "address")}
        if kind == "vlan":
            vid = re.search(r"VID:\s*(\d+)", _read(self.paths.proc_net / "vlan" / name))
            if vid:
                fields["vlan_id"] = int(vid.group(1))
        tunnel = self._tunnels.get(name)
        if tunnel is not None:
            fields.update(remotes=list(tunnel.remotes), local=tunnel.local, dev=tunnel.dev)
        return Link.model_validate(fields)

    @staticmethod
    def _lowers_first(candidates: dict[str, tuple[str, list[str]]]) -> list[tuple[str, tuple[str, list[str]]]]:
        def depth(name: str, seen: frozenset = frozenset()) -> int:
            lowers = [lower for lower in candidates[name][1] if lower in candidates and lower not in seen]
            return 1 + max((depth(lower, seen | {name}) for lower in lowers), default=0)
        return sorted(candidates.items(), key=lambda item: (depth(item[0]), item[0]))

    # ------------------------------------------------ addresses and routes
    def addresses(self, routes: list[Route]) -> list[Address]:
        found: list[Address] = []
        # IPv6: /proc/net/if_inet6, minus what the kernel makes by itself (link-local, host
        # scope) and privacy addresses, which change anyway.
        for line in _read(self.paths.proc_net / "if_inet6").splitlines():
            fields = line.split()
            if len(fields) != 6 or fields[5] == "lo":
                continue
            scope, flags = int(fields[3], 16), int(fields[4], 16)
            if scope in (IPV6_SCOPE_HOST, IPV6_SCOPE_LINK) or flags & IFA_F_TEMPORARY:
                continue
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            found.append(Address(dev=fields[5], address=f"{address}/{int(fields[2], 16)}"))
        # IPv4: procfs has no per-interface address list. fib_trie lists the local addresses
        # (".../32 host LOCAL"); the interface and prefix length are those of the connected
        # route (no gateway) of /proc/net/route that contains it, the longest one.
        connected = [(ipaddress.ip_network(r.prefix), r.dev) for r in routes
                     if r.family == 4 and not r.gateway and r.dst != "default"]
        for local in sorted(self._local_ipv4()):
            nets = [(net, dev) for net, dev in connected if local in net]
            if nets:
                net, dev = max(nets, key=lambda item: item[0].prefixlen)
                found.append(Address(dev=dev, address=f"{local}/{net.prefixlen}"))
            else:
                self.notes.append(f"address {local} not recorded: no connected route names its interface")
        return found

    def _local_ipv4(self) -> set[ipaddress.IPv4Address]:
        local: set[ipaddress.IPv4Address] = set()
        leaf = ""
        for line in _read(self.paths.proc_net / "fib_trie").splitlines():
            fields = line.split()
            if fields[:1] == ["|--"] and len(fields) == 2:
                leaf = fields[1]
            elif leaf and fields[:1] == ["/32"] and fields[-1:] == ["LOCAL"]:
                address = ipaddress.IPv4Address(leaf)
                if not address.is_loopback:
                    local.add(address)
        return local

    def routes(self) -> list[Route]:
        # The host reader parses no metric: routes are recorded with metric 0. An ECMP route is
        # recorded as one route per next hop (the same to the guard).
        return [
            Route(dev=r.dev, dst="default" if r.is_default else r.prefix, gateway=r.gateway, family=r.family,
                  table=r.table)
            for r in read_routing(self.paths)[0]
        ]

    def rules(self) -> list[RuleSpec]:
        """The policy rules beyond the kernel's own (local, main, default)."""
        recorded = []
        for rule in read_routing(self.paths)[1]:
            if (rule.priority, rule.table) in ((0, 255), (32766, 254), (32767, 253)):
                continue
            source = rule.selector.removeprefix("from ") if rule.selector.startswith("from ") else ""
            if rule.selector and not source:
                self.notes.append(f"rule {rule.priority} ({rule.selector}) recorded without its selector")
            recorded.append(RuleSpec(priority=rule.priority, table=rule.table, source=source.split(" ")[0],
                                     family=rule.family, l3mdev=rule.l3mdev))
        return recorded

    def network_storage(self) -> dict:
        """Network mounts as the mount table shows them, iSCSI and NVMe-oF target addresses."""
        mounts = []
        for line in _read(self.paths.under("/proc/self/mountinfo")).splitlines():
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) >= 5 and len(rest) >= 3 and rest[0] in NETWORK_FILESYSTEMS:
                mounts.append(Mount(fstype=rest[0], source=rest[1], target=fields[4].replace("\\040", " "),
                                    options=rest[2]))
        blocks = read_block_transports(self.paths)
        return {"mounts": mounts, "iscsi": [b.server for b in blocks if b.kind == "iSCSI"],
                "nvme_of": [b.server for b in blocks if b.kind == "NVMe-oF"]}

    # --------------------------------------------------------------- topology
    def record(self) -> Topology:
        functions = self.functions()
        netdevs = {fn.netdev for fn in functions if fn.netdev}
        links = self.links(netdevs)
        known = netdevs | {link.name for link in links}
        routes = self.routes()
        addresses = self.addresses(routes)
        dropped = sorted({item.dev for item in (*routes, *addresses) if item.dev not in known})
        if dropped:
            self.notes.append(f"routes and addresses of {', '.join(dropped)} not recorded: interfaces not recorded")
        hostname = _read(self.paths.under("/proc/sys/kernel/hostname"))
        fields: dict = {
            "description": f"recorded from {hostname or self.paths.root}",
            "iommu": bool(_listdir(self.paths.class_iommu)),
            "functions": functions,
            "links": links,
            "addresses": [a for a in addresses if a.dev in known],
            "routes": [r for r in routes if r.dev in known],
            "rules": self.rules(),
            **self.network_storage(),
        }
        cmdline = _read(self.paths.proc_cmdline)
        if cmdline:
            fields["cmdline"] = cmdline
        fields["platform"] = self.platform()
        return Topology.model_validate(fields)

    def platform(self) -> dict:
        """What the preflight check reads, as the simulator's [platform] table."""
        found = read_platform(self.paths)
        remapping = "on" if found.interrupt_remapping else (
            "unsupported" if any(unit.interrupt_remapping is False for unit in found.units) else "off")
        loader = {"GRUB": "grub", "systemd-boot": "systemd-boot", "proxmox-boot-tool": "proxmox-boot-tool"}
        return {"cpu": found.cpu_vendor or "intel", "virtualization": found.virtualization, "kvm": found.kvm,
                "firmware_iommu": bool(found.firmware_iommu), "interrupt_remapping": remapping,
                "unsafe_interrupts": found.unsafe_interrupts,
                "vfio": {"registered": "module", "loadable": "module", "built in": "builtin"}.get(found.vfio_pci, "missing"),
                "boot_loader": loader.get(found.boot_loader.name, "none"),
                "kernel_release": found.kernel_release or "unknown"}


def record(paths: HostPaths) -> Topology:
    """This host's topology (read-only). Raises ``RecorderError`` when there is no /sys to read."""
    return _Recorder(paths).record()


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def dump_topology_toml(topology: Topology, notes: list[str] = ()) -> str:
    data = topology.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    lines = [f"# {note}".replace("\n", " ") for note in notes]
    lines += [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, (list, dict))]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]", *(f"{name} = {_toml_value(value)}" for name, value in table.items())]
    for key, tables in data.items():
        if isinstance(tables, list):
            for table in tables:
                lines += ["", f"[[{key}]]", *(f"{name} = {_toml_value(value)}" for name, value in table.items())]
    return "\n".join(lines) + "\n"


def record_to(paths: HostPaths, target: str) -> int:
    """``--record-topology``: write the topology to ``target`` ("-": stdout; TOML if *.toml)."""
    recorder = _Recorder(paths)
    try:
        topology = recorder.record()
    except (RecorderError, OSError, ValidationError, ValueError) as exc:
        print(f"nicpassd: cannot record the topology of {paths.root}: {exc}", file=sys.stderr)
        return 1
    for note in recorder.notes:
        print(f"nicpassd: note: {note}", file=sys.stderr)
    if target.endswith(".toml"):
        text = dump_topology_toml(topology, [*recorder.notes, f"nicpassd --record-topology of {paths.root}"])
    else:
        text = dump_topology_json(topology) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(target).write_text(text)
    except OSError as exc:
        print(f"nicpassd: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0
