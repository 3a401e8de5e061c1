"""The e2e guest: boots the image built by ``tests/e2e/lab/build`` under QEMU 10 and drives it.

Stdlib only. One ``Guest`` per test session:

* QEMU 10 runs chrooted into the trixie tree in a private mount namespace (the host's own QEMU,
  if any, is never used); it is a child of this process and dies with it (PR_SET_PDEATHSIG).
* q35 + intel-iommu (intremap, caching-mode), a management virtio NIC on slirp with
  ``restrict=on`` (a default route with no way out), an ``igb`` (SR-IOV) and an ``e1000e`` each
  behind its own PCIe root port, two empty root ports for hot-plug, 9p shares for the checkout
  (``/mnt/src``, read-only) and the suite's run folder (``/mnt/e2e``, read-only: wheels, files).
* Commands run through qemu-guest-agent on a virtio-serial port: no network is involved, so
  scenarios may reconfigure every guest NIC.
* No ``-no-reboot``: a guest reboot keeps QEMU and the disk overlay (persistence scenarios).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("NICPASSD_E2E_CACHE", "/var/cache/nicpassd-e2e"))
QROOT = CACHE / "qemu-root"
IMAGES = CACHE / "images"

MGMT_MAC = "52:54:00:00:00:01"
IGB_MAC = "52:54:00:00:01:01"
E1000E_MAC = "52:54:00:00:02:01"
# sysrq_always_enabled: a wedged guest is asked where it is (conftest._last_words)
KERNEL_ARGS = "console=ttyS0,115200 root=/dev/vda rw intel_iommu=on iommu=pt panic=-1 sysrq_always_enabled"
GUEST_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME=/root", "LANG=C.UTF-8", "TERM=dumb"]
PR_SET_PDEATHSIG = 1


class GuestError(RuntimeError):
    pass


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> "Result":
        if self.returncode != 0:
            raise GuestError(f"guest command failed ({self.returncode}): {shlex.join(self.argv)}\n"
                             f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")
        return self


# ----------------------------------------------------------------------------- JSON sockets
class _JsonSock:
    """Line-delimited JSON over a unix socket: QMP and the guest agent frame messages alike."""

    def __init__(self, path: Path, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.buf = b""

    def send(self, obj: dict) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no answer")
                self.sock.settimeout(left)
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("socket closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            line = line.split(b"\xff")[-1].strip()  # 0xFF: the agent's sync delimiter
            if line:
                return json.loads(line)

    def close(self) -> None:
        self.sock.close()


class QMP(_JsonSock):
    def __init__(self, path: Path, timeout: float = 10) -> None:
        super().__init__(path, timeout)
        self.events: list[dict] = []
        self.recv(timeout)  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, args: dict | None = None, timeout: float = 30):
        self.send({"execute": name, **({"arguments": args} if args else {})})
        while True:
            reply = self.recv(timeout)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise GuestError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_event(self, name: str, timeout: float, match=lambda e: True) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name and match(event):
                    self.events.remove(event)
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                reply = self.recv(left)
            except TimeoutError:
                return None
            if "event" in reply:
                self.events.append(reply)


class Agent(_JsonSock):
    """qemu-guest-agent. Sync first: answers to an interrupted earlier client may be queued."""

    def __init__(self, path: Path, timeout: float = 5) -> None:
        super().__init__(path, timeout)
        self._sync_tokens: set[int] = set()
        try:
            self._sync(timeout)
        except BaseException:
            self.close()
            raise

    def _sync(self, timeout: float) -> None:
        sent = self._sync_tokens  # answers to all of them may still arrive: cmd() skips those
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            token = random.randint(1, 2**31)
            sent.add(token)
            self.send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
            until = min(deadline, time.monotonic() + 1)
            while time.monotonic() < until:
                try:
                    reply = self.recv(until - time.monotonic())
                except TimeoutError:
                    break
                if reply.get("return") in sent:
                    return
        raise TimeoutError("guest agent did not answer")

    def cmd(self, name: str, args: dict | None = None, timeout: float = 30):
        self.send({"execute": name, **({"arguments": args} if args else {})})
        while True:
            reply = self.recv(timeout)
            if isinstance(reply.get("return"), int) and reply["return"] in self._sync_tokens:
                continue  # a late answer to one of the sync requests, not ours
            break
        if "error" in reply:
            raise GuestError(f"guest agent {name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")


# ----------------------------------------------------------------------------------- guest
# QEMU runs chrooted into the trixie tree. /dev, /proc, /sys are bind-mounted for it, the cache
# keeps its path inside, and the two shared folders are bind-mounted at fixed points. Everything
# is private to QEMU's mount namespace and vanishes with it.
LAUNCH = r'''
set -e
q=$1 cache=$2 src=$3 share=$4; shift 4
mount --rbind /dev "$q/dev"
mount -t proc proc "$q/proc"
mount --rbind /sys "$q/sys"
mount --bind "$cache" "$q$cache"
mkdir -p "$q/mnt/e2e-src" "$q/mnt/e2e-share"
mount --bind "$src" "$q/mnt/e2e-src"
mount --bind "$share" "$q/mnt/e2e-share"
exec chroot "$q" "$@"
'''


def _pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Guest:
    def __init__(self, run_dir: Path, src: Path, share: Path, *, mem: int = 2560, smp: int = 2,
                 log=print) -> None:
        self.run_dir = run_dir
        self.src = src
        self.share = share
        self.mem = mem
        self.smp = smp
        self.log = log
        self.qmp_sock = run_dir / "qmp.sock"
        self.qga_sock = run_dir / "qga.sock"
        self.serial_log = run_dir / "serial.log"
        self.proc: subprocess.Popen | None = None
        self._agent_lock = threading.Lock()
        self.times: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def argv(self) -> list[str]:
        cores = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        return [
            "qemu-system-x86_64", "-name", "nicpassd-e2e", "-machine", "q35", *cores,
            "-m", str(self.mem), "-smp", str(self.smp),
            "-nodefaults", "-vga", "none", "-display", "none",
            # the vIOMMU first; caching-mode: every map is reported (nested VFIO needs it)
            "-device", "intel-iommu,intremap=on,caching-mode=on",
            "-kernel", str(IMAGES / "vmlinuz"), "-initrd", str(IMAGES / "initrd.img"),
            "-append", KERNEL_ARGS,
            "-drive", f"if=none,id=disk0,file={self.run_dir}/disk.qcow2,format=qcow2,cache=unsafe,discard=unmap",
            "-device", "virtio-blk-pci,drive=disk0,bus=pcie.0,addr=0x3",
            "-chardev", f"file,id=ser0,path={self.serial_log}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-chardev", f"socket,id=qga0,path={self.qga_sock},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x4",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            "-fsdev", "local,id=fs-src,path=/mnt/e2e-src,security_model=none,readonly=on",
            "-device", "virtio-9p-pci,fsdev=fs-src,mount_tag=src,bus=pcie.0,addr=0x5",
            "-fsdev", "local,id=fs-e2e,path=/mnt/e2e-share,security_model=none,readonly=on",
            "-device", "virtio-9p-pci,fsdev=fs-e2e,mount_tag=e2e,bus=pcie.0,addr=0x6",
            "-device", "pcie-root-port,id=rp-mgmt,chassis=1,bus=pcie.0,addr=0x10",
            "-device", "pcie-root-port,id=rp-igb,chassis=2,bus=pcie.0,addr=0x11",
            "-device", "pcie-root-port,id=rp-e1000e,chassis=3,bus=pcie.0,addr=0x12",
            "-device", "pcie-root-port,id=rp-hp0,chassis=4,bus=pcie.0,addr=0x13",
            "-device", "pcie-root-port,id=rp-hp1,chassis=5,bus=pcie.0,addr=0x14",
            # management NIC: slirp with restrict=on, nothing leaves the QEMU process
            "-netdev", "user,id=net-mgmt,restrict=on,ipv6=off",
            "-device", f"virtio-net-pci,id=nic-mgmt,netdev=net-mgmt,mac={MGMT_MAC},bus=rp-mgmt,romfile=",
            # test NICs on an internal hub: they only see each other
            "-netdev", "hubport,id=net-igb,hubid=1",
            "-device", f"igb,id=nic-igb,netdev=net-igb,mac={IGB_MAC},bus=rp-igb,romfile=",
            "-netdev", "hubport,id=net-e1000e,hubid=1",
            "-device", f"e1000e,id=nic-e1000e,netdev=net-e1000e,mac={E1000E_MAC},bus=rp-e1000e,romfile=",
        ]

    def _in_qemu_root(self, argv: list[str], **kw) -> subprocess.Popen:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", LAUNCH, "sh",
             str(QROOT), str(CACHE), str(self.src), str(self.share), *argv],
            env=env, preexec_fn=_pdeathsig, **kw)

    def start(self, timeout: float = 600) -> None:
        for needed in (IMAGES / "rootfs.img", IMAGES / "vmlinuz", QROOT / "usr/bin/qemu-system-x86_64"):
            if not needed.exists():
                raise GuestError(f"{needed} missing: run tests/e2e/lab/build first")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        img = self._in_qemu_root(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                                  str(IMAGES / "rootfs.img"), str(self.run_dir / "disk.qcow2")])
        if img.wait() != 0:
            raise GuestError("qemu-img create failed")
        argv = self.argv()
        (self.run_dir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
        t0 = time.monotonic()
        self.proc = self._in_qemu_root(argv, stdout=open(self.run_dir / "qemu.log", "wb"),
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wait_ready(timeout, t0, "boot")

    def wait_ready(self, timeout: float, t0: float, what: str) -> None:
        """Wait for the guest agent, then for systemd to finish starting up."""
        deadline = t0 + timeout
        while True:
            self._check_alive()
            try:
                with self.agent(timeout=min(5, max(1, deadline - time.monotonic()))):
                    break
            except (OSError, TimeoutError, ConnectionError, ValueError):
                if time.monotonic() > deadline:
                    raise GuestError(f"guest agent silent after {timeout:.0f}s; see {self.serial_log}") from None
                time.sleep(0.5)
        self.times[f"{what}_agent"] = time.monotonic() - t0
        state = self.run(["systemctl", "is-system-running", "--wait"],
                         timeout=max(30, deadline - time.monotonic())).stdout.strip()
        self.times[f"{what}_ready"] = time.monotonic() - t0
        self.log(f"e2e: {what}: guest agent after {self.times[f'{what}_agent']:.1f}s, "
                 f"systemd {state!r} after {self.times[f'{what}_ready']:.1f}s")

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            log = (self.run_dir / "qemu.log")
            detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise GuestError(f"QEMU is not running (exit {self.proc and self.proc.returncode}): {detail}")

    def boot_id(self) -> str:
        return self.run(["cat", "/proc/sys/kernel/random/boot_id"]).check().stdout.strip()

    def reboot(self, timeout: float = 600) -> float:
        """Reboot the guest in place (same QEMU, same disk overlay); returns the seconds taken."""
        before = self.boot_id()
        t0 = time.monotonic()
        with self.agent() as agent:
            agent.send({"execute": "guest-shutdown", "arguments": {"mode": "reboot"}})  # no reply
        while True:  # wait until the old agent is gone and a new boot answers
            time.sleep(2)
            try:
                if self.boot_id() != before:
                    break
            except (OSError, TimeoutError, ConnectionError, GuestError, ValueError):
                pass
            self._check_alive()
            if time.monotonic() - t0 > timeout:
                raise GuestError(f"guest did not come back within {timeout:.0f}s")
        self.wait_ready(timeout, t0, "reboot")
        return time.monotonic() - t0

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        t0 = time.monotonic()
        try:
            with self.agent(timeout=3) as agent:
                agent.send({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})
        except (OSError, TimeoutError, ConnectionError, ValueError, GuestError):
            with contextlib.suppress(Exception):
                self.qmp("system_powerdown")
        try:
            self.proc.wait(timeout)
            self.log(f"e2e: guest powered off in {time.monotonic() - t0:.1f}s")
        except subprocess.TimeoutExpired:
            self.log("e2e: guest did not power off; killing QEMU")
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # ------------------------------------------------------------------- commands
    @contextlib.contextmanager
    def agent(self, timeout: float = 10):
        with self._agent_lock:
            agent = Agent(self.qga_sock, timeout)
            try:
                yield agent
            finally:
                agent.close()

    def run(self, argv: list[str] | str, *, stdin: bytes | str | None = None, timeout: float = 300,
            user: str | None = None) -> Result:
        """Run a command in the guest (a string runs under ``sh -c``); never raises on exit code."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                    "env", f"HOME=/home/{user}", f"USER={user}", *argv]
        args = {"path": argv[0], "arg": argv[1:], "env": GUEST_ENV, "capture-output": True}
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else stdin
            args["input-data"] = base64.b64encode(data).decode()
        t0 = time.monotonic()
        with self.agent() as agent:
            pid = agent.cmd("guest-exec", args)["pid"]
            delay = 0.02
            while True:
                status = agent.cmd("guest-exec-status", {"pid": pid})
                if status["exited"]:
                    break
                if time.monotonic() - t0 > timeout:
                    agent.cmd("guest-exec", {"path": "/bin/kill", "arg": ["-KILL", str(pid)]})
                    raise GuestError(f"timed out after {timeout:.0f}s: {shlex.join(argv)}")
                time.sleep(delay)
                delay = min(delay * 1.5, 0.3)
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        code = status["exitcode"] if "exitcode" in status else 128 + status.get("signal", 0)
        return Result(argv, code, out, err, time.monotonic() - t0)

    def sh(self, script: str, **kw) -> str:
        """Run a shell script with ``set -e``; its stdout, or GuestError on failure."""
        return self.run(["/bin/bash", "-ec", script], **kw).check().stdout

    def read(self, path: str) -> str:
        return self.run(["cat", path]).check().stdout

    def write_file(self, path: str, data: str, mode: str = "0644") -> None:
        self.run(["/bin/sh", "-c", f"umask 022; cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}"],
                 stdin=data).check()

    # ------------------------------------------------------------------------ QMP
    def qmp(self, name: str, args: dict | None = None, timeout: float = 30):
        q = QMP(self.qmp_sock)
        try:
            return q.cmd(name, args, timeout)
        finally:
            q.close()

    def device_del(self, dev_id: str, timeout: float = 60) -> float:
        """Hot-unplug: device_del, then wait for QEMU's DEVICE_DELETED (the guest let go)."""
        q = QMP(self.qmp_sock)
        try:
            t0 = time.monotonic()
            q.cmd("device_del", {"id": dev_id})
            if not q.wait_event("DEVICE_DELETED", timeout, lambda e: e["data"].get("device") == dev_id):
                raise GuestError(f"no DEVICE_DELETED for {dev_id} within {timeout}s")
            return time.monotonic() - t0
        finally:
            q.close()

    def device_add(self, dev_id: str, driver: str, bus: str, netdev: str, mac: str) -> None:
        try:
            self.qmp("netdev_add", {"type": "hubport", "id": netdev, "hubid": 1})
        except GuestError as exc:
            if "Duplicate" not in str(exc) and "already" not in str(exc):
                raise
        self.qmp("device_add", {"driver": driver, "id": dev_id, "bus": bus, "netdev": netdev,
                                "mac": mac, "romfile": ""})
