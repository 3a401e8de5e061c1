"""The shipped system files, checked by the tools that will read them (systemd, xmllint, tomllib)."""

import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support import REPO

UNIT = REPO / "systemd" / "nicpassd.service"
POLKIT_POLICY = REPO / "packaging" / "polkit" / "org.nicpass.NicPass1.policy"
POLKIT_DTD = Path("/usr/share/polkit-1/policyconfig-1.dtd")
CONFIG_EXAMPLE = REPO / "packaging" / "nicpassd.toml"
INTERFACE_MD = REPO.parent / "shared" / "spec" / "interface.md"
# The actions interface.md names; also read from interface.md itself when it is beside the repo.
CONTRACT_ACTIONS = {"org.nicpass.NicPass1.manage", "org.nicpass.NicPass1.lease"}
# Measured 2.9 ("OK") with systemd 252; systemd-analyze takes the threshold in tenths.
EXPOSURE_THRESHOLD = 30


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is missing: run scripts/setup"
    return path


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (systemd allows repeating keys), across sections."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def installed_unit(tmp_path_factory) -> Path:
    """The unit with ExecStart pointing at this venv's real nicpassd (verify checks it exists)."""
    daemon = Path(sys.prefix) / "bin" / "nicpassd"
    assert daemon.is_file(), f"{daemon} is missing: the package is not installed (scripts/setup)"
    text = UNIT.read_text()
    assert "\nExecStart=/usr/bin/nicpassd\n" in text
    copy = tmp_path_factory.mktemp("unit") / "nicpassd.service"
    copy.write_text(text.replace("\nExecStart=/usr/bin/nicpassd\n", f"\nExecStart={daemon}\n"))
    return copy


def test_unit_verifies_without_warnings(installed_unit):
    result = subprocess.run([need("systemd-analyze"), "verify", "--man=no", str(installed_unit)],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and typos and only says so on stderr.
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_unit_security_exposure_stays_low(installed_unit):
    result = subprocess.run(
        [need("systemd-analyze"), "security", "--offline=true", "--no-pager",
         f"--threshold={EXPOSURE_THRESHOLD}", str(installed_unit)],
        capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: (\S+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert result.returncode == 0, (
        f"exposure {level.group(1)} is over {EXPOSURE_THRESHOLD / 10}:\n{result.stdout}")


def test_unit_keeps_what_the_daemon_needs():
    s = unit_settings(UNIT.read_text())
    one = {key: values[-1] for key, values in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["BusName"] == "org.nicpass.NicPass1"
    assert one["WatchdogSec"] and one["Restart"] == "on-failure"
    # The daemon's exit status for a bad config or state file (EX_CONFIG): not a restart loop.
    from nicpassd.daemon import EXIT_CONFIG
    assert one["RestartPreventExitStatus"].split() == [str(EXIT_CONFIG)]
    # Leases and the undo journal live in /run/nicpassd and must outlive a daemon restart.
    assert one["RuntimeDirectory"] == "nicpassd" and one["RuntimeDirectoryPreserve"] == "yes"
    assert one["StateDirectory"] == "nicpassd" and one["ConfigurationDirectory"] == "nicpassd"
    # Persisted state must be applied before hypervisors autostart VMs.
    assert {"libvirtd.service", "pve-guests.service"} <= set(" ".join(s["Before"]).split())
    # Hardening must not take away writing /sys, host netlink, modprobe or /proc/cmdline (Check).
    for forbidden in ("PrivateNetwork", "ProtectKernelTunables", "ProtectKernelModules"):
        assert one.get(forbidden, "no") == "no", f"{forbidden}= would break the daemon"
    assert one.get("ProcSubset", "all") == "all"
    assert "AF_NETLINK" in one["RestrictAddressFamilies"].split()
    assert "CAP_SYS_MODULE" in one["CapabilityBoundingSet"].split()
    assert "@module" in s["SystemCallFilter"][0].split()
    assert "/sys" in one["ReadWritePaths"].split()


def test_polkit_policy_validates_against_polkit_dtd():
    assert POLKIT_DTD.is_file(), f"{POLKIT_DTD} is missing (package polkitd): run scripts/setup"
    result = subprocess.run(
        [need("xmllint"), "--noout", "--nonet", "--dtdvalid", str(POLKIT_DTD), str(POLKIT_POLICY)],
        capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def polkit_actions() -> dict[str, dict[str, str]]:
    root = ET.parse(POLKIT_POLICY).getroot()
    return {a.get("id"): {d.tag: d.text for d in a.find("defaults")} for a in root.iter("action")}


def contract_actions() -> set[str]:
    actions = set(CONTRACT_ACTIONS)
    if INTERFACE_MD.is_file():
        row = next(line for line in INTERFACE_MD.read_text().splitlines()
                   if line.startswith("| polkit actions"))
        actions |= set(re.findall(r"`(org\.nicpass\.NicPass1\.[a-z][\w-]*)`", row))
    return actions


def daemon_actions() -> set[str]:
    """Action ids the code asks polkit about (lower-case leaf; interfaces and errors are not)."""
    pattern = re.compile(r"[\"'](org\.nicpass\.NicPass1\.[a-z][\w-]*)[\"']")
    return {m for d in ("nicpassd", "client") for f in (REPO / d).rglob("*.py")
            for m in pattern.findall(f.read_text())}


def test_polkit_policy_defines_every_action_in_use():
    defined = polkit_actions()
    missing = (contract_actions() | daemon_actions()) - defined.keys()
    assert not missing, f"actions used but not defined in {POLKIT_POLICY.name}: {missing}"


def test_polkit_defaults_ask_an_admin():
    actions = polkit_actions()
    for action in ("org.nicpass.NicPass1.manage", "org.nicpass.NicPass1.lease"):
        assert actions[action] == {"allow_any": "no", "allow_inactive": "no",
                                   "allow_active": "auth_admin_keep"}, action
    # Overriding the guard is asked for every time: never a kept authorization.
    assert actions["org.nicpass.NicPass1.force"] == {
        "allow_any": "no", "allow_inactive": "no", "allow_active": "auth_admin"}


def test_config_example_is_valid_toml_with_the_documented_keys():
    config = tomllib.loads(CONFIG_EXAMPLE.read_text())
    assert config == {
        "guard": {"management_interfaces": [], "management_prefixes": [], "never_touch": []},
        "release": {"policy": "keep"},
        "daemon": {"write_timeout": 30, "log_level": "info"},
    }


def run_scripts_test(tests_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "test"), "-q", "-p", "no:cacheprovider",
                           str(tests_dir)], capture_output=True, text=True, timeout=600)


def test_scripts_test_fails_when_no_test_runs(tmp_path):
    (tmp_path / "test_nothing.py").write_text("")
    result = run_scripts_test(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "collected no tests" in result.stderr


def test_scripts_test_passes_pytest_through(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    result = run_scripts_test(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
