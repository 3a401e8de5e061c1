"""A private dbus-daemon of type "system" that enforces the project's own bus policy.

The generated config is Debian's default system-bus policy (deny owning names and method calls
unless a policy file allows them) plus an <include> of dbus/org.nicpass.NicPass1.conf from this
tree, so tests exercise the shipped policy, not a copy of it.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import REPO

POLICY_FILE = REPO / "dbus" / "org.nicpass.NicPass1.conf"
_PR_SET_PDEATHSIG = 1

# Debian 12's /usr/share/dbus-1/system.conf policy, minus what needs a real system (user switch,
# service activation, syslog, SELinux).
_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>

  <include>{policy}</include>
{includes}
  <!-- Test only: the polkit mock runs as root (real polkitd runs as user polkitd). -->
  <policy user="root">
    <allow own="org.freedesktop.PolicyKit1"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
</busconfig>
"""


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even by SIGKILL (no teardown then).
    Clients such as the polkit mock exit when their bus goes away."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class PrivateBus:
    """dbus-daemon on a socket in a fresh temporary directory; `address` is its client address."""

    def __init__(self, includes: Sequence[os.PathLike | str] = (), timeout: float = 10.0):
        if not POLICY_FILE.is_file():
            raise FileNotFoundError(f"the project's bus policy is missing: {POLICY_FILE}")
        self.dir = Path(tempfile.mkdtemp(prefix="nicpass-bus-"))
        # Unprivileged test callers (setpriv to nobody) must reach the socket inside.
        self.dir.chmod(0o755)
        self.socket = self.dir / "system_bus_socket"
        self.config = self.dir / "bus.conf"
        extra = "".join(f"  <include>{Path(p).resolve()}</include>\n" for p in includes)
        self.config.write_text(
            _CONFIG.format(socket=self.socket, policy=POLICY_FILE, includes=extra))
        self.log = self.dir / "dbus-daemon.log"
        if shutil.which("dbus-daemon") is None:
            self.stop()
            raise RuntimeError("dbus-daemon is not installed: run scripts/setup")
        self.address = self._start(timeout)

    def _start(self, timeout: float) -> str:
        read_fd, write_fd = os.pipe()
        try:
            with open(self.log, "wb") as log:
                # stdout must not be a pipe we never read: --print-address goes to its own fd.
                self.process = subprocess.Popen(
                    ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--nopidfile",
                     f"--print-address={write_fd}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    pass_fds=(write_fd,), preexec_fn=_die_with_parent)
            os.close(write_fd)
            write_fd = -1
            # The address is printed once the daemon listens; EOF means it died.
            ready, _, _ = select.select([read_fd], [], [], timeout)
            line = os.read(read_fd, 4096).decode().strip() if ready else ""
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        if not line:
            self.stop()
            raise RuntimeError(f"dbus-daemon did not start: {self._log_tail()}")
        return line

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:] or "(no output)"
        except FileNotFoundError:
            return "(no log)"

    def name_has_owner(self, name: str) -> bool:
        out = subprocess.run(
            ["busctl", f"--address={self.address}", "call", "org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner", "s", name],
            capture_output=True, text=True, check=True, timeout=10).stdout
        return out.strip() == "b true"

    def wait_for_name(self, name: str, timeout: float = 10.0,
                      process: subprocess.Popen | None = None) -> None:
        """Wait until `name` has an owner; fail early when `process` (its owner-to-be) exits."""
        deadline = time.monotonic() + timeout
        while not self.name_has_owner(name):
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited ({process.returncode}) "
                                   f"before owning {name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} got no owner on the private bus in {timeout} s")
            time.sleep(0.02)

    def stop(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateBus:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
