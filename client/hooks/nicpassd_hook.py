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
costs (no re, json, struct, subprocess, xml.etree, socket — `import socket` alone costs more than
the rest of the helper): pyexpat parses the XML, and the helper talks D-Bus itself over an
AF_UNIX socket (_socket): EXTERNAL authentication, Hello and the method call sent in one write, then
the reply read — no busctl process, no second interpreter. Messages go to stderr, one line;
stdout stays empty.
Exit codes: 0 done (or nothing to do), 1 refused or failed (the VM must not start).
"""

import posix  # os without the cost of importing os (~1.5 ms under -S: _collections_abc, posixpath)
import sys
from time import monotonic as _monotonic


def getenv(name):
    """An environment variable ("" when unset): posix.environ is the environment at start, so a
    process that imported os (a test importing this module) may have changed it since."""
    os_module = sys.modules.get("os")
    if os_module is not None:
        return os_module.environ.get(name, "")
    return posix.environ.get(name.encode(), b"").decode(errors="surrogateescape")


BUS_NAME = "org.nicpass.NicPass1"
MANAGER_PATH = "/org/nicpass/NicPass1"
MANAGER_IFACE = "org.nicpass.NicPass1.Manager"
PREPARE_TIMEOUT = 120  # seconds: binds are verified, a slow driver probe can take a while
ACTIVATE_TIMEOUT = 15
ROOT = getenv("NICPASSD_ROOT").rstrip("/")  # tests and the simulator move the root
PROG = "nicpassd hook"

ERROR_PREFIX = "org.nicpass.NicPass1.Error."


def say(text):
    posix.write(2, (f"{PROG}: {text}\n").encode(errors="replace"))


def under_root(path):
    return ROOT + path


# -------------------------------------------------------------------------- D-Bus
# A minimal D-Bus client: one method call on the system bus, no process spawned. The wire format
# (https://dbus.freedesktop.org/doc/dbus-specification.html): after a line-based SASL handshake,
# messages are a 12-byte fixed header (endianness, type, flags, version, body length, serial), an
# array of header fields a(yv), padding to 8, and the body; every value aligned to its size
# (arrays and strings to 4, structs and dict entries to 8), counted from the message start.
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4  # message types; flags stay 0 (no interactive auth)
MAX_MESSAGE = 128 << 20  # the specification's limit
DAEMON_GONE = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")

_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4, "s": 4, "o": 4,
          "g": 1, "v": 1, "a": 4, "(": 8, "{": 8}
_FIXED = {"y": (1, False), "b": (4, False), "n": (2, True), "q": (2, False), "i": (4, True), "u": (4, False),
          "x": (8, True), "t": (8, False), "h": (4, False)}


class BusError(Exception):
    """An error reply (``name``: the D-Bus error name), or ``name`` "" when the bus is unusable."""

    def __init__(self, name, message):
        super().__init__(message)
        self.name = name
        self.message = message


class BusUnreachable(BusError):
    """No bus to talk to (no socket, refused, closed before the handshake)."""

    def __init__(self, message):
        super().__init__("", message)


def split_signature(signature):
    """'ssasa{sv}' -> ['s', 's', 'as', 'a{sv}']: the complete types of a signature."""
    types, index = [], 0
    while index < len(signature):
        end = _type_end(signature, index)
        types.append(signature[index:end])
        index = end
    return types


def _type_end(signature, index):
    code = signature[index] if index < len(signature) else ""
    if code == "a":
        return _type_end(signature, index + 1)
    if code in ("(", "{"):
        close, depth = {"(": ")", "{": "}"}[code], 0
        for end in range(index, len(signature)):
            if signature[end] in "({":
                depth += 1
            elif signature[end] in ")}":
                depth -= 1
                if depth == 0:
                    if signature[end] != close:
                        break
                    return end + 1
        raise ValueError(f"unbalanced signature {signature!r}")
    if code not in _ALIGN or code in ")}":
        raise ValueError(f"bad signature {signature!r}")
    return index + 1


def _pad(buffer, alignment):
    buffer += b"\0" * (-len(buffer) % alignment)


def marshal(buffer, signature, values):
    """Append ``values`` (one per complete type of ``signature``) to ``buffer`` (a bytearray whose
    offset 0 is the message start), little-endian. Python values: int, bool, str, list (a), dict
    (a{..}), tuple/list (struct), (signature, value) for a variant."""
    types = split_signature(signature)
    if len(types) != len(values):
        raise ValueError(f"signature {signature!r} takes {len(types)} values, got {len(values)}")
    for kind, value in zip(types, values):
        _put(buffer, kind, value)
    return buffer


def _put(buffer, kind, value):
    code = kind[0]
    _pad(buffer, _ALIGN[code])
    if code in _FIXED:
        size, signed = _FIXED[code]
        buffer += int(value).to_bytes(size, "little", signed=signed)
    elif code in ("s", "o"):
        data = value.encode()
        buffer += len(data).to_bytes(4, "little") + data + b"\0"
    elif code == "g":
        data = value.encode()
        buffer.append(len(data))
        buffer += data + b"\0"
    elif code == "d":
        from _struct import pack

        buffer += pack("<d", value)
    elif code == "v":
        signature, inner = value
        _put(buffer, "g", signature)
        _put(buffer, signature, inner)
    elif code == "a":
        element = kind[1:]
        at = len(buffer)
        buffer += b"\0\0\0\0"
        _pad(buffer, _ALIGN[element[0]])  # padding before the first element is not counted
        start = len(buffer)
        for item in (value.items() if element[0] == "{" else value):
            _put(buffer, element, item)
        length = len(buffer) - start
        if length > 1 << 26:
            raise ValueError("array longer than 64 MiB")
        buffer[at:at + 4] = length.to_bytes(4, "little")
    else:  # ( or {
        members = split_signature(kind[1:-1])
        if len(members) != len(value):
            raise ValueError(f"{kind} takes {len(members)} values, got {len(value)}")
        for member, item in zip(members, value):
            _put(buffer, member, item)


def unmarshal(data, offset, end, signature, order="little"):
    """The values of ``signature`` in ``data[offset:end]`` (offsets count from the message start)."""
    values = []
    for kind in split_signature(signature):
        value, offset = _get(data, offset, end, kind, order)
        values.append(value)
    return values


def _get(data, offset, end, kind, order):
    code = kind[0]
    offset += -offset % _ALIGN[code]
    if code in _FIXED:
        size, signed = _FIXED[code]
        if offset + size > end:
            raise ValueError("message truncated")
        value = int.from_bytes(data[offset:offset + size], order, signed=signed)
        return (bool(value) if code == "b" else value), offset + size
    if code in ("s", "o", "g"):
        if code == "g":
            length, offset = data[offset], offset + 1
        else:
            length, offset = int.from_bytes(data[offset:offset + 4], order), offset + 4
        if offset + length + 1 > end:
            raise ValueError("message truncated")
        return bytes(data[offset:offset + length]).decode(errors="replace"), offset + length + 1
    if code == "d":
        from _struct import unpack_from

        return unpack_from("<d" if order == "little" else ">d", data, offset)[0], offset + 8
    if code == "v":
        signature, offset = _get(data, offset, end, "g", order)
        if len(split_signature(signature)) != 1:
            raise ValueError(f"variant of signature {signature!r}")
        value, offset = _get(data, offset, end, signature, order)
        return (signature, value), offset
    if code == "a":
        length, offset = int.from_bytes(data[offset:offset + 4], order), offset + 4
        element = kind[1:]
        offset += -offset % _ALIGN[element[0]]
        stop = offset + length
        if stop > end:
            raise ValueError("message truncated")
        items = []
        while offset < stop:
            item, offset = _get(data, offset, stop, element, order)
            items.append(item)
        return (dict(items) if element[0] == "{" else items), offset
    values = []  # ( or {
    for member in split_signature(kind[1:-1]):
        value, offset = _get(data, offset, end, member, order)
        values.append(value)
    return tuple(values), offset


def message(serial, kind, fields, signature="", body=()):
    """A complete message: header fields {code: (signature, value)}, then the body."""
    buffer = marshal(bytearray(), signature, list(body)) if signature else bytearray()
    if signature:
        fields = {**fields, 8: ("g", signature)}
    header = bytearray(b"l" + bytes((kind, 0, 1)) + len(buffer).to_bytes(4, "little") + serial.to_bytes(4, "little"))
    _put(header, "a(yv)", sorted(fields.items()))
    _pad(header, 8)
    return bytes(header + buffer)


def bus_addresses(text):
    """The unix socket addresses of a D-Bus address list ('unix:path=/x;unix:abstract=y')."""
    found = []
    for entry in text.split(";"):
        transport, _, params = entry.partition(":")
        values = {}
        for pair in params.split(","):
            key, _, value = pair.partition("=")
            values[key] = _unescape(value)
        if transport == "unix" and values.get("path"):
            found.append(values["path"])
        elif transport == "unix" and values.get("abstract"):
            found.append("\0" + values["abstract"])
    return found


def _unescape(text):
    if "%" not in text:
        return text
    out, index = bytearray(), 0
    raw = text.encode()
    while index < len(raw):
        digits = raw[index + 1:index + 3].decode(errors="replace").lower()
        if raw[index] == 0x25 and _hex(digits, 2):  # %XX
            out.append(int(digits, 16))
            index += 3
        else:
            out.append(raw[index])
            index += 1
    return out.decode(errors="replace")


class Connection:
    """One connection to a message bus, authenticated with EXTERNAL (the socket's credentials)."""

    def __init__(self, timeout, address=""):
        import _socket  # not socket: that module imports enum, selectors... (~14 ms)

        self._socket_module = _socket
        self.timeout = timeout
        self.deadline = _monotonic() + timeout
        self.buffer = bytearray()
        self.unique_name = ""
        address = address or getenv("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS
        paths = bus_addresses(address)
        if not paths:
            raise BusUnreachable(f"no unix socket in the bus address {address!r}")
        error = None
        for path in paths:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            self.sock = sock
            self.address = path.replace("\0", "@")
            return
        raise BusUnreachable(f"cannot connect to the system bus at {address}: "
                             f"{error.strerror or error}")

    def close(self):
        self.sock.close()

    def _recv(self, size=65536):
        try:
            self.sock.settimeout(max(0.001, self.deadline - _monotonic()))
            chunk = self.sock.recv(size)
        except self._socket_module.timeout:
            raise BusError("org.freedesktop.DBus.Error.Timeout", f"no reply within {self.timeout:g} s") from None
        except OSError as exc:
            raise BusUnreachable(f"the connection to the system bus failed: {exc.strerror or exc}") from None
        if not chunk:
            raise BusUnreachable("the system bus closed the connection")
        self.buffer += chunk

    def call(self, destination, path, interface, member, signature="", body=()):
        """Hello, then the call, sent at once with the handshake; returns the reply's values or
        raises BusError with the error's name and message."""
        uid = str(posix.geteuid()).encode().hex().encode()
        hello = message(1, METHOD_CALL, {1: ("o", "/org/freedesktop/DBus"), 2: ("s", "org.freedesktop.DBus"),
                                         3: ("s", "Hello"), 6: ("s", "org.freedesktop.DBus")})
        fields = {1: ("o", path), 3: ("s", member), 6: ("s", destination)}
        if interface:
            fields[2] = ("s", interface)
        request = message(2, METHOD_CALL, fields, signature, body)
        try:
            self.sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\nBEGIN\r\n" + hello + request)
        except OSError as exc:
            raise BusUnreachable(f"cannot talk to the system bus: {exc.strerror or exc}") from None
        while b"\r\n" not in self.buffer:
            if len(self.buffer) > 16384:
                raise BusUnreachable("the system bus answered the handshake with garbage")
            self._recv()
        line, _, rest = bytes(self.buffer).partition(b"\r\n")
        if not line.startswith(b"OK "):
            raise BusUnreachable(f"the system bus refused the connection ({line.decode(errors='replace')})")
        self.buffer = bytearray(rest)
        while True:
            kind, fields, data, offset, end, order = self._read_message()
            if fields.get(5) == 1:  # Hello's reply: our unique name
                if kind == ERROR:
                    raise BusUnreachable("the system bus refused Hello: "
                                         + self._error_text(fields, data, offset, end, order))
                if kind == METHOD_RETURN and fields.get(8) == "s":
                    self.unique_name = unmarshal(data, offset, end, "s", order)[0]
                continue
            if fields.get(5) != 2:  # signals (NameAcquired), anything else: not the call's reply
                continue
            if kind == METHOD_RETURN:
                return unmarshal(data, offset, end, fields.get(8, ""), order)
            if kind == ERROR:
                raise BusError(fields.get(4, "org.freedesktop.DBus.Error.Failed"),
                               self._error_text(fields, data, offset, end, order))

    @staticmethod
    def _error_text(fields, data, offset, end, order):
        signature = fields.get(8, "")
        if signature.startswith("s"):
            return unmarshal(data, offset, end, "s", order)[0]
        return fields.get(4, "unknown error")

    def _read_message(self):
        """(type, {field code: value}, data, body offset, body end, byte order) of the next message."""
        while len(self.buffer) < 16:
            self._recv()
        order = {0x6C: "little", 0x42: "big"}.get(self.buffer[0])
        if order is None:
            raise BusUnreachable("the system bus sent a message of unknown byte order")
        body_length = int.from_bytes(self.buffer[4:8], order)
        fields_length = int.from_bytes(self.buffer[12:16], order)
        body_offset = 16 + fields_length + (-(16 + fields_length) % 8)
        total = body_offset + body_length
        if total > MAX_MESSAGE:
            raise BusUnreachable("the system bus sent a message larger than 128 MiB")
        while len(self.buffer) < total:
            self._recv(min(max(total - len(self.buffer), 65536), 1 << 22))
        data = bytes(self.buffer[:total])
        del self.buffer[:total]
        raw_fields, _ = _get(data, 12, 16 + fields_length, "a(yv)", order)
        fields = {code: value for code, (_, value) in raw_fields}
        return data[1], fields, data, body_offset, total, order


def bus_call(timeout, member, signature, *args):
    """Call a Manager method of nicpassd on the system bus; returns (ok, error text, error name).
    The error name is "" when the bus itself cannot be reached."""
    try:
        connection = Connection(timeout)
    except BusError as exc:
        return False, exc.message, exc.name
    try:
        connection.call(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, signature, args)
    except BusError as exc:
        return False, exc.message, exc.name
    except (ValueError, IndexError) as exc:
        return False, f"unreadable reply from the system bus ({exc})", "org.freedesktop.DBus.Error.InvalidArgs"
    finally:
        connection.close()
    return True, "", ""


def daemon_down(name):
    """No bus, or nicpassd is not on it."""
    return name == "" or name in DAEMON_GONE


def prepare(vm_name, vm_uuid, devices, pidfile):
    options = {"pidfile": ("s", pidfile), "skip_unmanaged": ("b", True)}
    return bus_call(PREPARE_TIMEOUT, "Prepare", "ssasa{sv}", vm_name, vm_uuid, devices, options)


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


def finish_prepare(what, devices, ok, error, name):
    if ok:
        return 0
    if daemon_down(name):
        return refuse_or_pass_when_down(what, devices, error)
    say(f"cannot start {what}: {error}")
    return 1


# ------------------------------------------------------------------------ libvirt
def libvirt_prepare(guest):
    from nicpassd_domain_xml import domain_devices  # the daemon's own reading (nicpassd/domain_xml.py)

    xml = sys.stdin.buffer.read()
    try:
        name, uuid, devices = domain_devices(xml)
    except ValueError as exc:  # unreadable XML, a DOCTYPE, a bad number in an address
        say(f"cannot start VM {guest}: its domain XML cannot be read ({exc})")
        return 1
    if not devices:
        return 0
    if not uuid:
        say(f"cannot start VM {guest}: its domain XML has no <uuid>")
        return 1
    name = name or guest
    ok, error, error_name = prepare(name, uuid, devices, f"/run/libvirt/qemu/{guest}.pid")
    return finish_prepare(f"VM {name}", devices, ok, error, error_name)


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
            found = sorted(entry for entry in posix.listdir(under_root("/sys/bus/pci/devices"))
                           if entry.startswith(prefix + "."))
        except OSError:
            found = []
        addresses.extend(found or [f"{prefix}.0"])
    return addresses


def mapping_candidates(name):
    """The host ids a resource mapping gives this node, one string per 'map' line (a pool may
    have several): /etc/pve/mapping/pci.cfg, 'NAME' then indented 'map node=..,path=..,id=..'."""
    node = posix.uname().nodename.split(".")[0]
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
    error, error_name = "", ""
    for plan in plans[:16]:
        ok, error, error_name = prepare(name, uuid, plan, pidfile)
        if ok or error_name != ERROR_PREFIX + "Busy":
            return finish_prepare(what, plan, ok, error, error_name)
    return finish_prepare(what, plans[-1], False, error, error_name)


def pve_post_start(vmid):
    entries = read_conf(vmid)
    options = {}
    try:
        with open(under_root(f"/run/qemu-server/{vmid}.pid")) as handle:
            pid = int(handle.read().split()[0])
        if 0 < pid < 1 << 32:
            options["pid"] = ("u", pid)
    except (OSError, ValueError, IndexError):
        pass
    ok, error, error_name = bus_call(ACTIVATE_TIMEOUT, "Activate", "sa{sv}", pve_uuid(vmid, entries), options)
    if not ok and error_name != ERROR_PREFIX + "NotFound":
        say(f"VM {vmid}: could not tie the lease to the running VM: {error}")
    return 0  # post-start cannot stop the VM anyway


def pve_post_stop(vmid):
    ok, error, _ = bus_call(PREPARE_TIMEOUT, "Release", "sa{sv}", pve_uuid(vmid, read_conf(vmid)), {})
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
