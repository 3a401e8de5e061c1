#!/usr/bin/env python3
"""An idle nicpassd makes no periodic wakeups: CPU time, context switches and RSS over N idle seconds.

Starts ``nicpassd --simulate`` (the built-in host, its boot reconcile applying a persisted VF count
with vfio-pci VFs, so the inventory is not trivial) on a private dbus-daemon, waits until it owns its
name and the simulator's events settled, then samples /proc/PID (all threads) at the start and the
end of the idle window: utime+stime, voluntary and involuntary context switches, VmRSS/VmHWM.
No watchdog (WATCHDOG_USEC unset): its pings would be the only expected wakeups.

    .venv/bin/python bench/bench_idle.py [--seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.bus import PrivateBus  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> dict[str, float]:
    cpu = voluntary = involuntary = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    status = {line.split(":")[0]: line.split(":")[1].strip()
              for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line}
    return {"cpu_s": cpu, "voluntary": voluntary, "involuntary": involuntary,
            "rss_kib": int(status["VmRSS"].split()[0]), "hwm_kib": int(status["VmHWM"].split()[0]),
            "threads": int(status["Threads"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    state = root / "var/lib/nicpassd"
    state.mkdir(parents=True)
    # A persisted 16 vfio-pci VFs on the first X710 port: the boot reconcile creates them.
    state.joinpath("state.json").write_text(json.dumps({"version": 2, "generation": 1, "devices": {
        "0000:3b:00.0": {"address": "0000:3b:00.0", "num_vfs": 16, "vf_driver": "vfio-pci", "driver": "",
                         "identity": {"vendor_id": "8086", "device_id": "1572",
                                      "serial": "3c-fd-fe-ff-ff-a0-00-00"}}}}))
    env = {key: value for key, value in os.environ.items()
           if key not in ("WATCHDOG_USEC", "WATCHDOG_PID", "NOTIFY_SOCKET")}
    with PrivateBus() as bus:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        log = open(root / "nicpassd.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "nicpassd", "--simulate", "--root", str(root)],
                                  env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            bus.wait_for_name("org.nicpass.NicPass1", 30, process=daemon)
            time.sleep(2.0)  # let the last uevents and D-Bus signals drain
            first = sample(daemon.pid)
            time.sleep(args.seconds)
            last = sample(daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(10)
            log.close()
    shutil.rmtree(root, ignore_errors=True)
    result = {
        "idle_seconds": args.seconds,
        "cpu_ms": round((last["cpu_s"] - first["cpu_s"]) * 1000, 1),
        "context_switches": int(last["voluntary"] + last["involuntary"] - first["voluntary"] - first["involuntary"]),
        "rss_mib": round(last["rss_kib"] / 1024, 1), "peak_rss_mib": round(last["hwm_kib"] / 1024, 1),
        "threads": last["threads"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"idle {args.seconds:g} s: CPU {result['cpu_ms']} ms, {result['context_switches']} context switches "
              f"(all threads), RSS {result['rss_mib']} MiB (peak {result['peak_rss_mib']} MiB), "
              f"{result['threads']} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
