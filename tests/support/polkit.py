"""Launch the uid-deciding polkit mock (polkit_uid.py) on a private bus."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterable

from .bus import PrivateBus

TEMPLATE = Path(__file__).with_name("polkit_uid.py")
BUS_NAME = "org.freedesktop.PolicyKit1"
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
AUTHORITY_IFACE = "org.freedesktop.PolicyKit1.Authority"
TEST_IFACE = "org.nicpass.Test.PolkitMock"
# Debian's python3-dbusmock runs on the system interpreter: the venv need not build dbus-python.
PYTHON = "/usr/bin/python3"


class PolkitMock:
    """`python3 -m dbusmock --system -t polkit_uid.py` owning org.freedesktop.PolicyKit1."""

    def __init__(self, bus: PrivateBus, allowed_uids: Iterable[int] = (0,), timeout: float = 10.0):
        self.bus = bus
        self.log = bus.dir / "polkit-mock.log"
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
        params = json.dumps({"allowed_uids": list(allowed_uids)})
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "dbusmock", "--system", "--template", str(TEMPLATE),
                 "--parameters", params],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/")
        try:
            bus.wait_for_name(BUS_NAME, timeout, process=self.process)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"polkit mock did not start: {e}\n{self.log_text()[-2000:]}") from e

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _busctl(self, *args: str) -> str:
        return subprocess.run(
            ["busctl", f"--address={self.bus.address}", "--json=short", "call", BUS_NAME,
             AUTHORITY_PATH, *args],
            capture_output=True, text=True, check=True, timeout=10).stdout

    def checks(self) -> list[tuple[str, int, int, bool]]:
        """Every CheckAuthorization answered so far: (action id, uid, flags, authorized)."""
        data = json.loads(self._busctl(TEST_IFACE, "GetChecks"))["data"][0]
        return [tuple(row) for row in data]

    def clear(self) -> None:
        self._busctl(TEST_IFACE, "ClearChecks")

    def set_allowed_uids(self, uids: Iterable[int]) -> None:
        uids = [str(int(u)) for u in uids]
        self._busctl(TEST_IFACE, "SetAllowedUids", "au", str(len(uids)), *uids)

    def set_action_uids(self, action_id: str, uids: Iterable[int]) -> None:
        """Grant `action_id` to exactly `uids` (others keep the allowed_uids rule)."""
        uids = [str(int(u)) for u in uids]
        self._busctl(TEST_IFACE, "SetActionUids", "sau", action_id, str(len(uids)), *uids)

    def clear_action_uids(self) -> None:
        self._busctl(TEST_IFACE, "ClearActionUids")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> PolkitMock:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
