"""The daemon as systemd runs it: sd_notify READY/WATCHDOG/STOPPING, signals, exit statuses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from support.daemon import SimulatedDaemon

EX_CONFIG = 78


def receive_all(sock: socket.socket, until: str, timeout: float = 10.0) -> list[str]:
    messages, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in messages[-1]:
            break
    return messages


def test_notify_ready_watchdog_and_stopping(private_bus, polkit, tmp_path, monkeypatch):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # systemd would expect a ping every 0.2 s
    with sock, SimulatedDaemon(private_bus, tmp_path / "host") as daemon:
        ready = receive_all(sock, "READY=1")
        assert any("READY=1" in m and "STATUS=managing" in m for m in ready)
        pings = [m for m in receive_all(sock, "never", timeout=0.6) if "WATCHDOG=1" in m]
        assert len(pings) >= 3  # at half the interval: ~0.1 s apart
        daemon.process.send_signal(signal.SIGTERM)
        assert any("STOPPING=1" in m for m in receive_all(sock, "STOPPING=1"))
        assert daemon.process.wait(10) == 0


def test_sighup_with_a_broken_config_keeps_the_previous_one(private_bus, polkit, tmp_path):
    root = tmp_path / "host"
    with SimulatedDaemon(private_bus, root) as daemon:
        config = root / "etc/nicpassd/nicpassd.toml"
        config.parent.mkdir(parents=True)
        config.write_text("[guard]\nmanagement_prefixes = ['not a prefix']\n")
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in daemon.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload failed, keeping the previous configuration" in daemon.log_text()
        assert daemon.process.poll() is None
        assert private_bus.name_has_owner("org.nicpass.NicPass1")


def run_daemon(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "nicpassd", *args], capture_output=True, text=True,
                          timeout=30, env=env, stdin=subprocess.DEVNULL)


def test_bad_topology_and_bad_config_exit_ex_config(private_bus, tmp_path):
    topology = tmp_path / "bad.toml"
    topology.write_text("[[functions]]\naddress = 'nonsense'\nvendor = '8086'\ndevice = '1572'\n")
    result = run_daemon("--simulate", str(topology), "--root", str(tmp_path / "a"))
    assert result.returncode == EX_CONFIG
    assert "nonsense" in result.stderr and "Traceback" not in result.stderr

    config = tmp_path / "b/etc/nicpassd/nicpassd.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[daemon]\nwrite_timeout = -1\n")
    result = run_daemon("--simulate", "--root", str(tmp_path / "b"))
    assert result.returncode == EX_CONFIG
    assert "write_timeout" in result.stderr and "Traceback" not in result.stderr


def test_second_daemon_on_the_same_bus_refuses_to_start(private_bus, polkit, tmp_path):
    with SimulatedDaemon(private_bus, tmp_path / "first"):
        result = run_daemon("--simulate", "--root", str(tmp_path / "second"),
                            env_extra={"DBUS_SYSTEM_BUS_ADDRESS": private_bus.address})
        assert result.returncode == 1
        assert "another nicpassd" in result.stderr
