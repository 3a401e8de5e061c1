"""nicpassctl against a real private system bus with no nicpassd on it: every command exits 6.

The bus is the session's private ``dbus-daemon`` (``private_bus``, tests/support/bus.py): Debian's
default system policy plus the project's own policy file, so the client is checked the way it
runs on a host where the daemon is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.bus,
    pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon"),
]

REPO = Path(__file__).resolve().parents[2]
SENTENCE = "nicpassctl: nicpassd is not running on the system bus; start it with `systemctl start nicpassd`\n"


@pytest.fixture
def empty_system_bus(private_bus):
    """The session's private system bus (tests/conftest.py) with nobody owning org.nicpass.NicPass1."""
    assert not private_bus.name_has_owner("org.nicpass.NicPass1"), "a nicpassd is still on the bus"
    return private_bus.address


def nicpassctl(*argv, env, timeout=30):
    # the source tree's client first, so the test also runs without an installed package
    pythonpath = os.pathsep.join(filter(None, [str(REPO / "client"), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "nicpassctl", *argv], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": pythonpath}, timeout=timeout)


COMMANDS = [
    ["list"], ["list", "--all"], ["--json", "list"], ["show", "0000:3b:00.0"], ["--json", "show", "enp59s0f0"],
    ["check"], ["vfs", "0000:3b:00.0", "4"], ["vfs", "--runtime", "--vfio", "3b:00.0", "0"],
    ["bind", "0000:3b:02.0", "0000:3b:02.1"], ["--json", "bind", "3b:02.0"], ["unbind", "3b:02.0"],
    ["forget", "--restore", "3b:02.0"], ["guard"], ["leases"], ["--json", "leases"],
    ["prepare", "web", "6f1c2d3e-0000-0000-0000-000000000001", "3b:02.0"],
    ["release", "6f1c2d3e-0000-0000-0000-000000000001"], ["monitor"], ["--json", "monitor"], ["version"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a))
def test_every_command_exits_6_via_environment(empty_system_bus, argv):
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": empty_system_bus}
    result = nicpassctl(*argv, env=env)
    assert (result.returncode, result.stderr) == (6, SENTENCE)
    if "--json" in argv:  # the failure as an object on stdout too (issue 20)
        answer = json.loads(result.stdout)
        assert (answer["exit_code"], answer["message"]) == (6, SENTENCE.removeprefix("nicpassctl: ").strip())
    else:
        assert result.stdout == ""


@pytest.mark.parametrize("argv", [["list"], ["vfs", "0000:3b:00.0", "4"], ["monitor"]], ids=" ".join)
def test_bus_address_option(empty_system_bus, argv):
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/bus"}
    result = nicpassctl("--bus-address", empty_system_bus, *argv, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (6, "", SENTENCE)


@pytest.mark.parametrize("argv", [["list"], ["bind", "x"], ["monitor"]], ids=" ".join)
def test_no_bus_socket_exits_6(tmp_path, argv):
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-such-socket"}
    result = nicpassctl(*argv, env=env)
    assert result.returncode == 6 and result.stdout == ""
    assert result.stderr.startswith("nicpassctl: nicpassd is not running on the system bus (")
    assert result.stderr.endswith("; start it with `systemctl start nicpassd`\n")
    assert result.stderr.count("\n") == 1
    with_json = nicpassctl("--json", *argv, env=env)  # no socket at all: the object on stdout too
    assert with_json.returncode == 6 and json.loads(with_json.stdout)["exit_code"] == 6


def test_console_script_if_installed(empty_system_bus):
    script = Path(sys.executable).with_name("nicpassctl")
    if not script.exists():
        pytest.skip("nicpassctl console script not installed in this environment")
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": empty_system_bus}
    result = subprocess.run([str(script), "list"], capture_output=True, text=True, env=env, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (6, "", SENTENCE)
