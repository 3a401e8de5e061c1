"""`nicpassd --simulate` as a real process on the private bus, the way the demo and users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .bus import PrivateBus

BUS_NAME = "org.nicpass.NicPass1"


class SimulatedDaemon:
    def __init__(self, bus: PrivateBus, root: Path, topology: str | None = None, *,
                 extra_args: tuple[str, ...] = (), timeout: float = 20.0) -> None:
        self.bus = bus
        self.root = root
        self.log = root.parent / f"{root.name}-nicpassd.log"
        argv = [sys.executable, "-m", "nicpassd", "--simulate", *([topology] if topology else []),
                "--root", str(root), *extra_args]
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
        root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)
        try:
            bus.wait_for_name(BUS_NAME, timeout, process=self.process)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"nicpassd did not start: {exc}\n{self.log_text()[-3000:]}") from exc

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "SimulatedDaemon":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
