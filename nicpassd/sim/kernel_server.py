"""A simulated kernel in a process of its own, which outlives the daemon like the real kernel does.

``nicpassd --simulate`` normally builds the simulated kernel inside the daemon: a daemon restart is
then a reboot (the tree is rebuilt). To test what a *crash* of the daemon leaves behind, the
kernel must survive the daemon: ``nicpassd --simulate TOPO --root DIR --keep-kernel`` runs it here
instead — started on first use, then attached to by every later daemon on the same DIR — and
talks to it over a unix socket (DIR/run/nicpassd-sim/kernel.sock):

- the daemon's kernel writes go to the server (``RemoteKernel.write``/``load_module``: one
  connection per write, so a hung write never blocks another, as with sysfs); each write is
  carried out completely by the server even if the daemon dies meanwhile — like a write(2) in
  progress when its process is killed;
- uevents stream back on a subscription connection (``RemoteKernel.subscribe``), read on the
  daemon's event loop;
- the daemon reads the tree directly, as it reads /sys.

Reloading a tree from disk instead could not be honest: a daemon killed inside the simulator's
handling of one write would leave the tree half-changed, which the real kernel never shows.

Test controls (not the kernel's ABI): ``plug``/``unplug`` (hotplug), ``arm_kill`` (SIGKILL the
process making the Nth next write, right after the kernel carried it out: the sharpest crash
point), ``stop``.

    python -m nicpassd.sim.kernel_server --root DIR [TOPOLOGY]   # serve (foreground)
    python -m nicpassd.sim.kernel_server --root DIR --stop       # stop the one serving DIR

A second writer, for playing libvirt, driverctl or a careless admin against a running
``nicpassd --simulate --root DIR --keep-kernel`` (each exactly as ``echo VALUE > /sys/...`` or
``modprobe NAME`` would: the same errors, the same uevents):

    python -m nicpassd.sim.kernel_server --root DIR --write sys/bus/pci/devices/0000:01:00.0/driver_override vfio-pci
    python -m nicpassd.sim.kernel_server --root DIR --modprobe vfio-pci
"""

from __future__ import annotations

import argparse
import base64
import errno
import itertools
import json
import logging
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from nicpassd.host import procfs, vf_netlink
from nicpassd.host.events import UEvent, UEventCallback
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)
SOCKET = "/run/nicpassd-sim/kernel.sock"
PIDFILE = "/run/nicpassd-sim/kernel.pid"
LOGFILE = "/run/nicpassd-sim/kernel.log"


def socket_path(paths: HostPaths) -> Path:
    return paths.under(SOCKET)


# ------------------------------------------------------------------------------- client side
def _request(path: Path, message: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the simulated kernel closed the connection")
            data += chunk
    return json.loads(data)


def control(paths: HostPaths, op: str, **arguments: Any) -> dict[str, Any]:
    """Send a control request (plug, unplug, arm_kill, ping, stop) to the kernel serving ``paths``."""
    reply = _request(socket_path(paths), {"op": op, **arguments}, timeout=30)
    if "errno" in reply:
        raise OSError(reply["errno"], reply["message"])
    return reply


def alive(paths: HostPaths) -> bool:
    try:
        return control(paths, "ping").get("ok", False)
    except (OSError, ValueError):
        return False


class RemoteKernel:
    """The daemon's KernelWriter for a kernel served by this module."""

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.path = socket_path(paths)
        self._subscription: socket.socket | None = None
        self._loop = None

    def write(self, path: Path, data: str) -> None:
        reply = _request(self.path, {"op": "write", "path": os.fspath(path), "data": data})
        if "errno" in reply:
            raise OSError(reply["errno"], reply["message"])

    def load_module(self, name: str) -> None:
        reply = _request(self.path, {"op": "load_module", "name": name})
        if "errno" in reply:
            raise OSError(reply["errno"], reply["message"])

    def netlink(self, request: bytes) -> bytes:
        reply = _request(self.path, {"op": "netlink", "request": base64.b64encode(request).decode()})
        if "errno" in reply:
            raise OSError(reply["errno"], reply["message"])
        return base64.b64decode(reply["answer"])

    def hold_vfio_group(self, path: Path) -> Callable[[], None]:
        reply = _request(self.path, {"op": "hold_vfio_group", "path": os.fspath(path)})
        if "errno" in reply:
            raise OSError(reply["errno"], reply["message"])
        return lambda: _request(self.path, {"op": "release_vfio_group", "token": reply["token"]})

    def subscribe(self, callback: UEventCallback) -> None:
        """Deliver the kernel's uevents to ``callback`` (an asyncio reader on the running loop)."""
        import asyncio

        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(os.fspath(self.path))
        sock.sendall(b'{"op": "subscribe"}\n')
        buffered = b""
        while not buffered.endswith(b"\n"):  # the server acknowledges once it is subscribed
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the simulated kernel closed the subscription")
            buffered += chunk
        sock.setblocking(False)
        pending = bytearray()

        def readable() -> None:
            while True:
                try:
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    loop.remove_reader(sock.fileno())
                    log.error("the simulated kernel went away")
                    return
                pending.extend(chunk)
            *lines, rest = bytes(pending).split(b"\n")
            pending[:] = rest
            for line in lines:
                item = json.loads(line)
                callback(UEvent(item["action"], item["subsystem"], item["sys_name"], item.get("driver", ""),
                                tuple(item.get("pci_identity", ()))))

        loop.add_reader(sock.fileno(), readable)
        self._subscription, self._loop = sock, loop

    def close(self) -> None:
        if self._subscription is not None:
            self._loop.remove_reader(self._subscription.fileno())
            self._subscription.close()
            self._subscription = None


def spawn(paths: HostPaths, topology: str | None, *, timeout: float = 20.0) -> int:
    """Start a kernel server for ``paths`` in its own session (it outlives its parent); its pid."""
    log_path = paths.under(LOGFILE)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "nicpassd.sim.kernel_server", "--root", os.fspath(paths.root),
            *([topology] if topology else [])]
    with open(log_path, "ab") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while not alive(paths):
        if process.poll() is not None:
            raise RuntimeError(f"the simulated kernel exited ({process.returncode}); see {log_path}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the simulated kernel did not start within {timeout:g} s; see {log_path}")
        time.sleep(0.02)
    return process.pid


def stop(paths: HostPaths, timeout: float = 10.0) -> bool:
    """Stop the kernel serving ``paths``; False if none was running."""
    try:
        pid = int(paths.under(PIDFILE).read_text())
    except (OSError, ValueError):
        return False
    try:
        control(paths, "stop")
    except (OSError, ValueError):
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return True


# ------------------------------------------------------------------------------- server side
def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


class KernelServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, paths: HostPaths, kernel) -> None:
        self.paths = paths
        self.kernel = kernel
        self.subscribers: list[socket.socket] = []
        self.subscribers_lock = threading.Lock()
        self.kill_after: int = 0  # SIGKILL the writer after this many more writes (0 = off)
        self.kill_lock = threading.Lock()
        self.held: dict[str, tuple[int, Callable[[], None]]] = {}  # VFIO group holds: token → (writer pid, release)
        self.tokens = itertools.count(1)
        path = socket_path(paths)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        super().__init__(os.fspath(path), Handler)
        kernel.subscribe(self.broadcast)

    def broadcast(self, event: UEvent) -> None:
        line = json.dumps({"action": event.action, "subsystem": event.subsystem, "sys_name": event.sys_name,
                           "driver": event.driver, "pci_identity": event.pci_identity}).encode() + b"\n"
        with self.subscribers_lock:
            for sock in list(self.subscribers):
                try:
                    sock.sendall(line)
                except OSError:  # the daemon died: its events are lost, like a closed netlink socket
                    self.subscribers.remove(sock)


class Handler(socketserver.StreamRequestHandler):
    server: KernelServer

    def handle(self) -> None:
        line = self.rfile.readline()
        if not line:
            return
        request = json.loads(line)
        op = request.get("op")
        if op == "subscribe":
            with self.server.subscribers_lock:
                self.server.subscribers.append(self.connection)
            self.wfile.write(b'{"ok": true}\n')
            self.rfile.read()  # hold the connection until the daemon closes it (or dies)
            with self.server.subscribers_lock:
                if self.connection in self.server.subscribers:
                    self.server.subscribers.remove(self.connection)
            return
        try:
            reply = self.serve(op, request)
        except OSError as exc:
            reply = {"errno": exc.errno or errno.EIO, "message": exc.strerror or str(exc)}
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the writer is gone; the write itself has happened

    def count_change(self, what: str) -> None:
        """``arm_kill``: SIGKILL the writer right after its Nth change (a sysfs write or a VF
        setting), before it learns that the change was made."""
        server = self.server
        with server.kill_lock:
            if server.kill_after:
                server.kill_after -= 1
                if server.kill_after == 0:
                    pid = _peer_pid(self.connection)
                    log.warning("killing the writer (pid %d) right after %s", pid, what)
                    os.kill(pid, signal.SIGKILL)

    def serve(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        kernel, server = self.server.kernel, self.server
        if op == "write":
            kernel.write(Path(request["path"]), request["data"])
            self.count_change(f"its write to {Path(request['path']).name}")
            return {"ok": True}
        if op == "load_module":
            kernel.load_module(request["name"])
            return {"ok": True}
        if op == "netlink":
            message = base64.b64decode(request["request"])
            answer = kernel.netlink(message)
            if vf_netlink.NLMSGHDR.unpack_from(message)[1] == vf_netlink.RTM_SETLINK:
                self.count_change(f"its VF setting of {vf_netlink.parse_set(message)[0]}")
            return {"ok": True, "answer": base64.b64encode(answer).decode()}
        if op == "hold_vfio_group":
            # The kernel closes a dead process's files: so are the holds of a writer that died.
            for token, (pid, release) in list(server.held.items()):
                if not procfs.process_start_time(pid):  # the writer is gone
                    del server.held[token]
                    release()
            token = str(next(server.tokens))
            server.held[token] = (_peer_pid(self.connection), kernel.hold_vfio_group(Path(request["path"])))
            return {"ok": True, "token": token}
        if op == "release_vfio_group":
            held = server.held.pop(request["token"], None)
            if held is not None:
                held[1]()
            return {"ok": True}
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "arm_kill":
            with server.kill_lock:
                server.kill_after = int(request["count"])
            return {"ok": True}
        if op == "plug":
            from nicpassd.sim.topology import Function

            kernel.plug(Function.model_validate(request["function"]))
            return {"ok": True}
        if op == "unplug":
            kernel.unplug(request["address"])
            return {"ok": True}
        if op == "stop":
            threading.Thread(target=server.shutdown, daemon=True).start()
            return {"ok": True}
        raise OSError(errno.EINVAL, f"unknown request {op!r}")


def second_writer(paths: HostPaths, write: list[str] | None, module: str | None) -> int:
    """Someone else's write into the running simulated kernel, reported as a shell would."""
    if not alive(paths):
        print(f"no simulated kernel serves {paths.root} (start nicpassd --simulate --root {paths.root} "
              "--keep-kernel first)", file=sys.stderr)
        return 1
    kernel = RemoteKernel(paths)
    try:
        if module:
            kernel.load_module(module)
        if write:
            attribute, value = write
            kernel.write(paths.under("/" + attribute.lstrip("/")), value + "\n")
    except OSError as exc:
        what = f"modprobe {module}" if module and not write else f"write to {write[0]}"
        print(f"{what}: {os.strerror(exc.errno) if exc.errno else exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nicpassd.sim.kernel_server")
    parser.add_argument("topology", nargs="?", default=None)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--stop", action="store_true", help="stop the kernel serving --root")
    parser.add_argument("--no-udev-rule", action="store_true", help="do not run the early-binding udev helper")
    parser.add_argument("--write", nargs=2, metavar=("ATTRIBUTE", "VALUE"),
                        help="write VALUE (and a newline, as echo does) to ATTRIBUTE (relative to --root, e.g. "
                             "sys/bus/pci/devices/0000:01:00.0/driver_override) of the kernel serving --root")
    parser.add_argument("--modprobe", metavar="MODULE", help="load a driver module into the kernel serving --root")
    args = parser.parse_args(argv)
    paths = HostPaths(args.root)
    if args.stop:
        return 0 if stop(paths) else 1
    if args.write or args.modprobe:
        return second_writer(paths, args.write, args.modprobe)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s simkernel[%(process)d] %(levelname)s %(message)s")
    from nicpassd.host.early_binding import udev_rule
    from nicpassd.sim.kernel import SimKernel
    from nicpassd.sim.topology import TopologyError, load_topology

    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 78
    kernel = SimKernel(paths, topology, rules=() if args.no_udev_rule else (udev_rule,))
    server = KernelServer(paths, kernel)
    paths.under(PIDFILE).write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("simulated kernel serving %s on %s", paths.root, socket_path(paths))
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        socket_path(paths).unlink(missing_ok=True)
        paths.under(PIDFILE).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
