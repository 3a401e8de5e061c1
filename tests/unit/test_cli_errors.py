"""D-Bus error name → exit code and the one sentence nicpassctl prints."""

import pytest
from nicpassctl.errors import (
    Action,
    CliError,
    DaemonError,
    exit_code_for,
    from_daemon_error,
    from_exception,
    timed_out,
)
from nicpassctl.exitcodes import ExitCode

NP = "org.nicpass.NicPass1.Error."
FD = "org.freedesktop.DBus.Error."


def test_exit_code_values_are_the_contract():
    assert [(c.name, int(c)) for c in ExitCode] == [
        ("OK", 0), ("FAILED", 1), ("USAGE", 2), ("PROTECTED", 3), ("BUSY", 4),
        ("NOT_AUTHORIZED", 5), ("DAEMON_UNREACHABLE", 6), ("NOT_FOUND", 7),
        ("CHECK_FAILED", 8),  # beyond the contract's codes: `check` found a failure (issue 15)
    ]


@pytest.mark.parametrize(
    "name, code",
    [
        (NP + "InvalidArgument", 2),
        (NP + "NotFound", 7),
        (NP + "Protected", 3),
        (NP + "Busy", 4),
        (NP + "NotSupported", 1),
        (NP + "KernelError", 1),
        (NP + "Timeout", 1),
        (NP + "IdentityChanged", 1),
        (FD + "AccessDenied", 5),
        (FD + "InteractiveAuthorizationRequired", 5),
        (FD + "InvalidArgs", 2),
        (FD + "ServiceUnknown", 6),
        (FD + "NameHasNoOwner", 6),
        (FD + "Spawn.ChildExited", 6),
        (FD + "NoReply", 1),
        (FD + "UnknownMethod", 1),
        (FD + "Failed", 1),
        (NP + "SomethingNew", 1),
        ("com.example.Whatever", 1),
    ],
)
def test_error_name_to_exit_code(name, code):
    assert exit_code_for(name) == code
    err = from_daemon_error(DaemonError(name, "Some reason.\nMore detail.", "Bind"))
    assert err.code == code
    assert "\n" not in err.sentence and err.sentence


@pytest.mark.parametrize("name", ["Protected", "Busy", "NotFound", "InvalidArgument", "KernelError"])
def test_daemon_sentences_are_printed_as_sent(name):
    msg = "0000:3b:00.0 is protected: it carries the default route via eth0; pick another NIC."
    assert from_daemon_error(DaemonError(NP + name, msg)).sentence == msg


def test_daemon_message_whitespace_is_collapsed_to_one_line():
    err = from_daemon_error(DaemonError(NP + "KernelError", "  writing sriov_numvfs failed:\n  EBUSY.  "))
    assert err.sentence == "writing sriov_numvfs failed: EBUSY."


def test_empty_message_still_says_something():
    err = from_daemon_error(DaemonError(NP + "KernelError", ""))
    assert "KernelError" in err.sentence


def test_foreign_error_names_are_kept_for_diagnosis():
    err = from_daemon_error(DaemonError(FD + "Failed", "boom"))
    assert err.sentence == f"boom ({FD}Failed)"


def test_access_denied_names_action_and_polkit_action():
    action = Action("change the VF count of 0000:3b:00.0", "org.nicpass.NicPass1.manage")
    err = from_daemon_error(DaemonError(FD + "AccessDenied", "Not authorized (polkit says no)"), action)
    assert err.code == ExitCode.NOT_AUTHORIZED
    assert err.sentence == (
        "not authorized to change the VF count of 0000:3b:00.0; run as root or ask an administrator "
        "to grant org.nicpass.NicPass1.manage"
    )


def test_interactive_auth_required():
    action = Action("prepare devices for VM vm1", "org.nicpass.NicPass1.lease")
    err = from_daemon_error(DaemonError(FD + "InteractiveAuthorizationRequired", "x"), action)
    assert err.code == 5
    assert "without authentication" in err.sentence and "org.nicpass.NicPass1.lease" in err.sentence


def test_access_denied_on_a_read_points_at_the_bus_policy():
    err = from_daemon_error(DaemonError(FD + "AccessDenied", "Rejected send message"), Action("list devices"))
    assert err.code == 5 and err.sentence.startswith("not authorized to list devices; ")
    assert "D-Bus policy" in err.sentence


UNREACHABLE = "nicpassd is not running on the system bus"
REMEDY = "start it with `systemctl start nicpassd`"


@pytest.mark.parametrize("name", [FD + "ServiceUnknown", FD + "NameHasNoOwner"])
def test_service_unknown_is_the_fixed_sentence(name):
    err = from_daemon_error(DaemonError(name, "The name org.nicpass.NicPass1 was not provided by any .service"))
    assert err.code == 6
    assert err.sentence == f"{UNREACHABLE}; {REMEDY}"


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(2, "No such file or directory"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        EOFError(),
    ],
)
def test_connection_failures_are_unreachable(exc):
    err = from_exception(exc)
    assert err.code == 6
    assert err.sentence.startswith(UNREACHABLE) and err.sentence.endswith(REMEDY)


def test_auth_and_address_errors_of_the_bus_client():
    from jeepney import AuthenticationError
    from nicpassctl.connection import InvalidAddressError

    refused = from_exception(AuthenticationError(b"REJECTED EXTERNAL"))
    assert refused.code == 6 and "refused the connection" in refused.sentence
    assert from_exception(InvalidAddressError("bad")).code == 6
    # jeepney's own timeout (the bus did not answer the authentication) is an OSError
    assert from_exception(TimeoutError("Did not authenticate in 5.0 seconds")).code == 6


def test_version_skew():
    err = from_daemon_error(DaemonError(FD + "UnknownMethod", "No such method 'Unbind'", "Unbind"))
    assert err.code == 1 and "does not support Unbind" in err.sentence and "versions" in err.sentence


def test_unexpected_exception_is_failed():
    err = from_exception(RuntimeError("oops"))
    assert err.code == 1 and "oops" in err.sentence


def test_cli_error_passes_through():
    orig = CliError(ExitCode.BUSY, "x")
    assert from_exception(orig) is orig


def test_timeouts():
    err = timed_out(300, True)
    assert err.code == 1 and "300 seconds" in err.sentence and "--timeout" in err.sentence
    assert "may still complete" in err.sentence
    assert "may still complete" not in timed_out(25, False).sentence

