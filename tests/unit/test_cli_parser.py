"""nicpassctl argument parsing: usage errors exit 2 before any bus is touched."""

import pytest
from nicpassctl import cli
from nicpassctl.exitcodes import ExitCode


def _no_bus(args):  # a usage error must never reach the bus
    raise AssertionError("client created for a usage error")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["vfs"],
        ["vfs", "0000:3b:00.0"],
        ["vfs", "0000:3b:00.0", "-1"],
        ["vfs", "0000:3b:00.0", "four"],
        ["vfs", "0000:3b:00.0", "1.5"],
        ["vfs", "0000:3b:00.0", str(2**32)],
        ["bind"],
        ["unbind"],
        ["show"],
        ["show", "a", "b"],
        ["forget"],
        ["prepare", "vm"],
        ["prepare", "vm", "uuid"],
        ["release"],
        ["--timeout", "0", "list"],
        ["--timeout", "-3", "list"],
        ["--timeout", "soon", "list"],
        ["--timeout", "nan", "list"],
        ["list", "--bogus"],
        ["check", "--bogus"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv, client_factory=_no_bus) == ExitCode.USAGE == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage: nicpassctl" in captured.err


def test_version_is_offline(capsys):
    import nicpassd

    assert cli.main(["--version"], client_factory=_no_bus) == 0
    assert capsys.readouterr().out == f"nicpassctl {nicpassd.__version__}\n"  # one version for both


def test_help_exits_0(capsys):
    assert cli.main(["--help"], client_factory=_no_bus) == 0
    out = capsys.readouterr().out
    for command in ("list", "show", "check", "vfs", "bind", "unbind", "forget", "guard", "leases",
                    "prepare", "release", "monitor"):
        assert command in out
    assert "exit codes" in out


def parse(argv):
    return cli.build_parser().parse_args(argv)


def test_defaults():
    a = parse(["list"])
    assert (a.command, a.json, a.all, a.bus_address, a.timeout, a.interactive) == (
        "list", False, False, None, None, True)
    a = parse(["bind", "3b:02.0", "enp1s0"])
    assert a.device == ["3b:02.0", "enp1s0"] and a.driver == "vfio-pci" and not a.runtime
    a = parse(["vfs", "enp59s0f0", "0"])
    assert a.count == 0 and not a.runtime and not a.vfio
    a = parse(["unbind", "x"])
    assert not a.runtime
    a = parse(["forget", "x"])
    assert not a.restore


def test_json_before_or_after_command():
    assert parse(["--json", "list"]).json is True
    assert parse(["list", "--json"]).json is True
    assert parse(["--json", "list", "--all"]).all is True


def test_globals():
    a = parse(["--bus-address", "unix:path=/x", "--timeout", "2.5", "--no-ask-password", "leases"])
    assert a.bus_address == "unix:path=/x" and a.timeout == 2.5 and a.interactive is False


def test_options():
    a = parse(["vfs", "--runtime", "--vfio", "3b:00.0", "8"])
    assert a.runtime and a.vfio and a.count == 8
    a = parse(["bind", "--driver", "", "--runtime", "x"])
    assert a.driver == "" and a.runtime
    a = parse(["forget", "--restore", "x"])
    assert a.restore
    a = parse(["prepare", "vm1", "uuid-1", "a", "b"])
    assert (a.vm_name, a.vm_uuid, a.device) == ("vm1", "uuid-1", ["a", "b"])


def test_cli_does_not_import_the_daemon_pydantic_or_an_event_loop():
    """Issue 22: a command imports argparse, the renderer and a blocking bus client; asyncio
    alone would cost ~0.4 s of every command under TCG."""
    import subprocess
    import sys

    code = (
        "import sys, nicpassctl.cli, nicpassctl.commands, nicpassctl.connection, nicpassctl.render;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('nicpassd', 'pydantic', 'asyncio', 'dbus_fast')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_fast_paths_do_not_import_dbus():
    import subprocess
    import sys

    code = (
        "import sys; from nicpassctl import cli; rc = cli.main(['--version']);"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('dbus_fast', 'asyncio', 'nicpassd')"
        " or m == 'importlib.metadata'];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_mistyped_command_gets_a_did_you_mean_and_json_has_a_short_option(capsys):
    """Issue 20: the conventions of ip/nmcli/virsh."""
    from nicpassctl import cli

    assert cli.main(["lsit"]) == 2
    assert "invalid choice: 'lsit'; did you mean 'list'?" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err and "did you mean" not in err
    assert cli.build_parser().parse_args(["-j", "list"]).json is True
    assert cli.build_parser().parse_args(["show", "-j", "eno1"]).json is True


def test_a_command_may_be_any_prefix_that_names_one_command_only(capsys):
    """Issue 20: unambiguous prefixes, as `ip li` and `nmcli dev` take them."""
    assert (parse(["li"]).command, parse(["rec", "--plan"]).plan, parse(["imp", "--apply"]).command) == (
        "list", True, "import")
    assert parse(["vf", "3b:02.0", "trust", "on"]).command == "vf"  # an exact name wins over `vfs`
    assert cli.main(["re"]) == 2
    assert "'re' is ambiguous: it may be reconcile, release" in capsys.readouterr().err


def test_help_has_examples_and_names_devices_only_where_they_are_taken(capsys):
    """Issue 20: examples in the help; the DEVICE footer only on commands that take a device;
    every positional argument described."""
    import pytest

    for argv, has_device in ((["list", "--help"], False), (["bind", "--help"], True), (["leases", "--help"], False),
                             (["vfs", "--help"], True)):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)
        text = capsys.readouterr().out
        assert ("DEVICE is a PCI address" in text) is has_device, argv
        assert "exit codes:" in text
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["vfs", "--help"])
    text = capsys.readouterr().out
    assert "examples:\n  nicpassctl vfs enp59s0f0 8" in text
    assert "how many VFs (0 to TotalVfs)" in text and "the PF: a PCI address" in text
