"""nicpassd hook helper: the part of the libvirt and Proxmox hooks that needs more than sh.

Run only by the sh fronts (libvirt-qemu, nicpassd-pve-hook) through the stub
``nicpassd-hook-helper``, and only when a VM takes PCI devices, as
``python3 -S -I nicpassd-hook-helper MODE ARGS...``:

    libvirt-prepare GUEST       domain XML on stdin: Prepare every PCI device the domain takes
    pve PHASE VMID              pre-start: Prepare the hostpciN devices; post-start: Activate;
                                post-stop: Release

This is a module (not the script itself) so that Python keeps it compiled in __pycache__: a script
is compiled on every run, which cost more than everything else the helper does. Standard library
only, and few modules of it: this runs on every start of every such VM, so it imports nothing that
costs (no re, json, subprocess, xml.etree, socket): pyexpat parses the XML, busctl talks to
nicpassd (os.posix_spawnp). Messages go to stderr, one line; stdout stays empty.
Exit codes: 0 done (or nothing to do), 1 refused or failed (the VM must not start).
"""

import os
import sys

BUS_NAME = "org.nicpass.NicPass1"
MANAGER_PATH = "/org/nicpass/NicPass1"
MANAGER_IFACE = "org.nicpass.NicPass1.Manager"
PREPARE_TIMEOUT = 120  # seconds: binds are verified, a slow driver probe can take a while
ACTIVATE_TIMEOUT = 15
ROOT = os.environ.get("NICPASSD_ROOT", "").rstrip("/")  # tests and the simulator move the root
PROG = "nicpassd hook"

DAEMON_DOWN = ("was not provided by any .service files", "Failed to connect to bus",
               "org.freedesktop.DBus.Error.ServiceUnknown", "NameHasNoOwner", "Connection refused",
               "No such file or directory", "Transport endpoint is not connected")


def say(text):
    os.write(2, (f"{PROG}: {text}\n").encode(errors="replace"))


def under_root(path):
    return ROOT + path


# ------------------------------------------------------------------------- busctl
def busctl(timeout, member, signature, *args):
    """Call a Manager method through busctl; returns (ok, one-line error text)."""
    argv = ["busctl", "--system", "--quiet", "--expect-reply=yes", "--allow-interactive-authorization=no",
            f"--timeout={timeout}", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, signature,
            *[str(arg) for arg in args]]
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawnp("busctl", argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, write_end, 2),
            (os.POSIX_SPAWN_CLOSE, read_end)])
    except OSError as exc:
        os.close(read_end)
        return False, f"cannot run busctl: {exc.strerror} (install systemd's busctl)"
    finally:
        os.close(write_end)
        os.close(null)
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace").strip()
    if os.waitstatus_to_exitcode(status) == 0:
        return True, ""
    line = text.splitlines()[-1] if text else "busctl failed"
    line = line.removeprefix("Call failed: ")
    return False, line


def daemon_down(error):
    return any(marker in error for marker in DAEMON_DOWN)


def prepare(vm_name, vm_uuid, devices, pidfile):
    options = ["pidfile", "s", pidfile, "skip_unmanaged", "b", "true"]
    return busctl(PREPARE_TIMEOUT, "Prepare", "ssasa{sv}", vm_name, vm_uuid, len(devices), *devices,
                  len(options) // 3, *options)


def network_class(address):
    """True/False from sysfs (under the root); None when it cannot be read."""
    try:
        with open(under_root(f"/sys/bus/pci/devices/{address}/class"), "rb") as handle:
            return handle.read().strip().lower().removeprefix(b"0x").rjust(6, b"0").startswith(b"02")
    except OSError:
        return None


def refuse_or_pass_when_down(what, devices, error):
    """The daemon is not reachable. Refuse (exit 1) when a NIC is involved or it cannot be told;
    a domain whose PCI devices are all something else (a GPU...) is none of nicpassd's business."""
    if all(network_class(device) is False for device in devices):
        say(f"{what}: nicpassd is not running; none of {', '.join(devices)} is a NIC, starting anyway")
        return 0
    say(f"cannot start {what}: nicpassd is not running ({error}), so {', '.join(devices)} cannot be "
        "checked and prepared for passthrough; start it with `systemctl start nicpassd`")
    return 1


def finish_prepare(what, devices, ok, error):
    if ok:
        return 0
    if daemon_down(error):
        return refuse_or_pass_when_down(what, devices, error)
    say(f"cannot start {what}: {error}")
    return 1


# ------------------------------------------------------------------------ libvirt
def parse_number(text):
    text = (text or "0").strip().lower()
    return int(text, 16) if text.startswith("0x") else int(text, 10)


def pci_address(attrs):
    return "%04x:%02x:%02x.%x" % (parse_number(attrs.get("domain")), parse_number(attrs.get("bus")),
                                  parse_number(attrs.get("slot")), parse_number(attrs.get("function")))


def domain_devices(xml):
    """(name, uuid, [PCI addresses]) of a libvirt domain XML: <hostdev mode='subsystem' type='pci'>
    (managed yes or no) and <interface type='hostdev'>, each by <source><address .../>."""
    import pyexpat

    stack, attributes, texts, devices = [], [], {}, []
    parser = pyexpat.ParserCreate()

    def start(tag, attrs):
        stack.append(tag)
        attributes.append(attrs)
        depth = len(stack)
        if depth == 5 and stack[1] == "devices" and stack[3] == "source" and tag == "address":
            parent, kind = stack[2], attributes[2]
            if (parent == "hostdev" and kind.get("mode", "subsystem") == "subsystem" and kind.get("type") == "pci") \
                    or (parent == "interface" and kind.get("type") == "hostdev"):
                if attrs.get("type", "pci") == "pci":
                    devices.append(pci_address(attrs))

    def end(tag):
        stack.pop()
        attributes.pop()

    def text(data):
        if len(stack) == 2 and stack[1] in ("name", "uuid"):
            texts[stack[1]] = texts.get(stack[1], "") + data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    parser.Parse(xml, True)
    unique = []
    for device in devices:
        if device not in unique:
            unique.append(device)
    return texts.get("name", "").strip(), texts.get("uuid", "").strip(), unique


def libvirt_prepare(guest):
    xml = sys.stdin.buffer.read()
    try:
        name, uuid, devices = domain_devices(xml)
    except Exception as exc:  # pyexpat.ExpatError, a bad number in an address
        say(f"cannot start VM {guest}: its domain XML cannot be read ({exc})")
        return 1
    if not devices:
        return 0
    if not uuid:
        say(f"cannot start VM {guest}: its domain XML has no <uuid>")
        return 1
    name = name or guest
    ok, error = prepare(name, uuid, devices, f"/run/libvirt/qemu/{guest}.pid")
    return finish_prepare(f"VM {name}", devices, ok, error)


# ------------------------------------------------------------------------ Proxmox
def read_conf(vmid):
    """The current section of /etc/pve/qemu-server/VMID.conf (snapshots and [PENDING] follow it)."""
    entries = {}
    try:
        with open(under_root(f"/etc/pve/qemu-server/{vmid}.conf"), encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.strip()
                if line.startswith("["):
                    break
                if not line or line.startswith("#") or ":" not in line:
                    continue
                key, value = line.split(":", 1)
                entries[key.strip()] = value.strip()
    except FileNotFoundError:
        pass
    return entries


def property_string(text, default_key):
    """'0000:3b:02.0,pcie=1' or 'host=3b:02;3c:00.0,x-vga=1' -> {key: value} (PVE property string)."""
    values = {}
    for index, item in enumerate(text.split(",")):
        item = item.strip()
        if "=" in item:
            key, value = item.split("=", 1)
            values[key.strip()] = value.strip()
        elif index == 0 and item:
            values[default_key] = item
    return values


HEX = "0123456789abcdef"


def _hex(text, width):
    return len(text) == width and all(c in HEX for c in text)


def expand_host_ids(text):
    """'0000:3b:02.0', '3b:02.0', '3b:02' (every function of the slot), ';'-separated -> addresses.
    Raises ValueError naming an id it cannot read."""
    addresses = []
    for item in text.split(";"):
        pci_id = item.strip().lower()
        if not pci_id:
            continue
        parts = pci_id.split(":")
        if len(parts) == 2:
            parts.insert(0, "0000")
        if len(parts) != 3 or not _hex(parts[0], 4) or not _hex(parts[1], 2):
            raise ValueError(f"{item!r} is not a PCI address")
        slot, _, function = parts[2].partition(".")
        if not _hex(slot, 2) or (function and not (len(function) == 1 and function in "01234567")):
            raise ValueError(f"{item!r} is not a PCI address")
        prefix = f"{parts[0]}:{parts[1]}:{slot}"
        if function:
            addresses.append(f"{prefix}.{function}")
            continue
        try:
            found = sorted(entry for entry in os.listdir(under_root("/sys/bus/pci/devices"))
                           if entry.startswith(prefix + "."))
        except OSError:
            found = []
        addresses.extend(found or [f"{prefix}.0"])
    return addresses


def mapping_candidates(name):
    """The host ids a resource mapping gives this node, one string per 'map' line (a pool may
    have several): /etc/pve/mapping/pci.cfg, 'NAME' then indented 'map node=..,path=..,id=..'."""
    node = os.uname().nodename.split(".")[0]
    candidates, current = [], None
    try:
        with open(under_root("/etc/pve/mapping/pci.cfg"), encoding="utf-8", errors="replace") as handle:
            for raw in handle:
                if not raw.strip() or raw.lstrip().startswith("#"):
                    continue
                if not raw[0].isspace():
                    current = raw.strip()
                    if ":" in current and " " in current:  # a "type: id" header form
                        current = current.split(":", 1)[1].strip()
                    continue
                line = raw.strip()
                if current != name or not line.startswith("map "):
                    continue
                values = property_string(line[4:], "")
                if values.get("node") == node and values.get("path"):
                    candidates.append(values["path"])
    except FileNotFoundError:
        pass
    return node, candidates


def pve_devices(entries):
    """[(hostpciN, [[address, ...], ...]) ...]: per hostpci entry its candidate device sets (a
    mapping pool offers several; plain host= offers one)."""
    result = []
    for key in sorted((k for k in entries if k.startswith("hostpci") and k[7:].isdigit()), key=lambda k: int(k[7:])):
        values = property_string(entries[key], "host")
        if values.get("mapping"):
            node, paths = mapping_candidates(values["mapping"])
            if not paths:
                raise ValueError(f"{key}: resource mapping {values['mapping']!r} has no device on node {node}")
            result.append((key, [expand_host_ids(path) for path in paths]))
        elif values.get("host"):
            result.append((key, [expand_host_ids(values["host"])]))
    return result


def pve_uuid(vmid, entries):
    smbios = property_string(entries.get("smbios1", ""), "")
    return smbios.get("uuid") or f"pve-{vmid}"


def pve_pre_start(vmid):
    entries = read_conf(vmid)
    what = f"VM {vmid}"
    try:
        entries_devices = pve_devices(entries)
    except ValueError as exc:
        say(f"cannot start {what}: {exc}")
        return 1
    if not entries_devices:
        return 0
    name = entries.get("name") or vmid
    uuid = pve_uuid(vmid, entries)
    pidfile = f"/run/qemu-server/{vmid}.pid"
    fixed = [devices for _, choices in entries_devices if len(choices) == 1 for devices in choices]
    pools = [choices for _, choices in entries_devices if len(choices) > 1]
    chosen = [device for devices in fixed for device in devices]
    # A mapping pool: take the first member Prepare accepts (as Proxmox takes the first free one).
    plans = [chosen]
    for choices in pools:
        plans = [plan + [d for d in choice if d not in plan] for plan in plans for choice in choices]
    error = ""
    for plan in plans[:16]:
        ok, error = prepare(name, uuid, plan, pidfile)
        if ok or daemon_down(error) or "Busy" not in error and "leased to" not in error and "in use by" not in error:
            return finish_prepare(what, plan, ok, error)
    return finish_prepare(what, plans[-1], False, error)


def pve_post_start(vmid):
    entries = read_conf(vmid)
    options = []
    try:
        with open(under_root(f"/run/qemu-server/{vmid}.pid")) as handle:
            pid = int(handle.read().split()[0])
        options = ["pid", "u", pid]
    except (OSError, ValueError, IndexError):
        pass
    ok, error = busctl(ACTIVATE_TIMEOUT, "Activate", "sa{sv}", pve_uuid(vmid, entries), len(options) // 3, *options)
    if not ok and "holds no lease" not in error:
        say(f"VM {vmid}: could not tie the lease to the running VM: {error}")
    return 0  # post-start cannot stop the VM anyway


def pve_post_stop(vmid):
    ok, error = busctl(PREPARE_TIMEOUT, "Release", "sa{sv}", pve_uuid(vmid, read_conf(vmid)), 0)
    if not ok:
        say(f"VM {vmid}: could not release its devices: {error}")
    return 0  # a warning only; the lease is reclaimed when nicpassd sees the VM gone


def main(argv):
    mode = argv[1] if len(argv) > 1 else ""
    if mode == "libvirt-prepare" and len(argv) == 3:
        return libvirt_prepare(argv[2])
    if mode == "pve" and len(argv) == 4:
        phase, vmid = argv[2], argv[3]
        if not vmid.isdigit():
            say(f"{vmid!r} is not a Proxmox VM id")
            return 1 if phase == "pre-start" else 0
        handler = {"pre-start": pve_pre_start, "post-start": pve_post_start, "post-stop": pve_post_stop}.get(phase)
        return handler(vmid) if handler else 0
    say("usage: nicpassd-hook-helper libvirt-prepare GUEST < domain.xml | pve PHASE VMID")
    return 2
