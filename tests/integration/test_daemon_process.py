"""The daemon as systemd runs it: sd_notify READY/WATCHDOG/STOPPING, signals, exit statuses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
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
    """Issue 20: a refused reload is a crit journal line and a `fail` in `check` (which says which
    configuration is in force) until a reload succeeds."""
    root = tmp_path / "host"
    with SimulatedDaemon(private_bus, root) as daemon:
        config = root / "etc/nicpassd/nicpassd.toml"
        config.parent.mkdir(parents=True)
        config.write_text("[guard]\nmanagement_interface = ['br0']\n")  # the singular: a typo
        reload_and_wait(daemon, "reload failed")
        assert "CRITICAL reload failed, keeping the previous configuration" in daemon.log_text()  # priority crit
        assert daemon.process.poll() is None
        assert private_bus.name_has_owner("org.nicpass.NicPass1")
        result = nicpassctl(private_bus, "--json", "check")
        assert result.returncode == 8, result  # a fail finding
        finding = next(f for f in json.loads(result.stdout) if f["id"] == "config")
        assert finding["level"] == "fail", finding
        assert "management_interface" in finding["message"] and "did you mean management_interfaces" in \
            finding["message"] and "nicpassd --check-config" in finding["remedy"], finding

        config.write_text("[guard]\nmanagement_interfaces = ['br0']\n")
        reload_and_wait(daemon, "configuration reloaded")
        finding = next(f for f in json.loads(nicpassctl(private_bus, "--json", "check").stdout) if f["id"] == "config")
        assert finding["level"] == "ok" and str(config) in finding["message"], finding


def test_a_reload_asked_for_during_the_start_neither_kills_nor_is_lost(private_bus, tmp_path):
    """SIGHUP's default action ends a process: one that came before the reload handler was in
    place (the boot reconcile; CI once sent a test's SIGHUP in that window) killed the daemon.
    Before the configuration is read it is moot (ignored from nicpassd.start's first line); after,
    it is done once the daemon is ready."""
    root = tmp_path / "host"
    root.mkdir()
    log = tmp_path / "daemon.log"
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus.address)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "nicpassd", "--simulate", "--root", str(root)],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # its first line: it has read its configuration (Python's own start is not ours)
        while "ready:" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGHUP)  # all through the rest of the start
            time.sleep(0.02)
        assert process.poll() is None, log.read_text()[-2000:]
        assert "ready:" in log.read_text()
        while "configuration reloaded" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "a reload was asked for during the start: reloading" in log.read_text()
        assert "configuration reloaded" in log.read_text()
    finally:
        process.terminate()
        process.wait(10)


def reload_and_wait(daemon, said: str) -> None:
    before = daemon.log_text().count(said)
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while daemon.log_text().count(said) == before and time.monotonic() < deadline:
        time.sleep(0.05)


def nicpassctl(bus, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    return subprocess.run([sys.executable, "-m", "nicpassctl", *args], capture_output=True, text=True,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)


def test_check_config_names_each_problem_with_its_key_and_line(tmp_path):
    """Issue 20: `nicpassd --check-config [FILE]`, nginx -t for nicpassd: exit 0 or 78, one line
    per problem with the key and the line, a did-you-mean for an unknown key."""
    config = tmp_path / "nicpassd.toml"
    config.write_text("# host config\n[guard]\nmanagement_interface = ['br0']\nsession_ports = [22, 70000]\n"
                      "[daemon]\nlog_level = 'loud'\n")
    result = run_daemon("--check-config", str(config))
    assert result.returncode == EX_CONFIG and result.stdout == "", result
    assert result.stderr.splitlines() == [
        f"{config}:3: guard.management_interface: unknown key (did you mean management_interfaces?)",
        f"{config}:4: guard.session_ports: 70000 is not a TCP port",
        f"{config}:6: daemon.log_level: Input should be 'debug', 'info', 'warning' or 'error' (given: 'loud')",
    ]
    config.write_text("[guard\n")
    result = run_daemon("--check-config", str(config))
    assert result.returncode == EX_CONFIG and result.stderr.startswith(f"{config}:1: not valid TOML"), result
    config.write_text("[guard]\nmanagement_interfaces = ['br0']\n")
    assert run_daemon("--check-config", str(config)).stdout == f"{config}: ok\n"
    root = tmp_path / "root"  # without FILE: the daemon's own file under --root
    result = run_daemon("--check-config", "--root", str(root))
    assert result.returncode == 0 and "no such file; nicpassd runs with the defaults" in result.stdout, result


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


# --- bad files at start: the daemon as systemd sees it (tests/unit/test_bad_files.py: the rest) --
BAD_FILES = {
    "config": ("etc/nicpassd/nicpassd.toml", {
        "truncated": b"[daemon]\nwrite_tim", "not UTF-8": b"\xff\xfe[daemon]\n", "wrong type": b'[daemon]\nwrite_timeout = "soon"\n',
        "out of range": b"[daemon]\nwrite_timeout = 1e308\n"}),
    "state": ("var/lib/nicpassd/state.json", {
        "truncated": b'{"version": 2, "devi', "not UTF-8": b'\xff{"version": 2}',
        "wrong type": b'{"version": 2, "generation": 0, "devices": {"0000:3b:00.0": "vfio-pci"}}',
        "out of range": b'{"version": 2, "generation": -1, "devices": {}}'}),
}


@pytest.mark.parametrize("damage", ["truncated", "not UTF-8", "wrong type", "out of range", "directory"])
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_config_or_state_exits_78_and_leaves_the_file(private_bus, tmp_path, name, damage):
    """systemd's RestartPreventExitStatus=78: a bad file is no restart loop. The message names the
    file; the file is left exactly as it was."""
    relative, contents = BAD_FILES[name]
    path = tmp_path / "root" / relative
    path.parent.mkdir(parents=True)
    if damage == "directory":
        path.mkdir()
    else:
        path.write_bytes(contents[damage])
    result = run_daemon("--simulate", "--root", str(tmp_path / "root"))
    assert result.returncode == EX_CONFIG, result.stderr[-2000:]
    assert path.name in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert path.is_dir() if damage == "directory" else path.read_bytes() == contents[damage]


def test_a_state_directory_that_is_a_file_exits_78(private_bus, tmp_path):
    state_dir = tmp_path / "root/var/lib/nicpassd"
    state_dir.parent.mkdir(parents=True)
    state_dir.write_text("not a directory")
    result = run_daemon("--simulate", "--root", str(tmp_path / "root"))
    assert result.returncode == EX_CONFIG, result.stderr[-2000:]
    assert "/var/lib/nicpassd" in result.stderr and "Traceback" not in result.stderr


def test_a_read_only_state_directory_changes_nothing_in_the_kernel(private_bus, polkit, tmp_path):
    """/var/lib/nicpassd on a read-only mount (EROFS): every mutation answers NotPersisted and the
    kernel stays as it was. The daemon runs in a mount namespace of its own (unshare -m), so the
    read-only bind mount is its alone."""
    root = tmp_path / "root"
    state_dir = root / "var/lib/nicpassd"
    state_dir.mkdir(parents=True)
    log = tmp_path / "nicpassd.log"
    script = (f'mount --bind "{state_dir}" "{state_dir}" && mount -o remount,bind,ro "{state_dir}" && '
              f'exec "{sys.executable}" -m nicpassd --simulate --root "{root}"')
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus.address)
    with open(log, "wb") as out:
        daemon = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        private_bus.wait_for_name("org.nicpass.NicPass1", 20, process=daemon)

        def busctl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["busctl", "--system", "call", "org.nicpass.NicPass1", "/org/nicpass/NicPass1",
                                   "org.nicpass.NicPass1.Manager", *args], env=env, capture_output=True, text=True,
                                  timeout=30)

        pf = root / "sys/bus/pci/devices/0000:3b:00.0"
        nic = root / "sys/bus/pci/devices/0000:af:00.0"
        for call in (("SetVfCount", "sua{sv}", "0000:3b:00.0", "2", "0"),
                     ("Bind", "ssa{sv}", "0000:af:00.0", "vfio-pci", "0")):
            result = busctl(*call)
            assert result.returncode != 0 and "Read-only file system" in result.stderr, (call, result)
        assert (pf / "sriov_numvfs").read_text().strip() == "0"
        assert os.path.basename(os.readlink(nic / "driver")) == "e1000e"
        assert (nic / "driver_override").read_text().strip() in ("", "(null)")
        assert daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.wait(10)
    assert "Traceback" not in log.read_text()
