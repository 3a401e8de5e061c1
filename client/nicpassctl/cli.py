"""nicpassctl: a thin, stateless command-line client of nicpassd (D-Bus only).

Parses arguments, makes the D-Bus calls of one command and prints the result: a table for
people, JSON with ``--json``. Failures are one sentence on stderr and an exit code from
:class:`~nicpassctl.exitcodes.ExitCode`. The bus client (blocking, jeepney: no event loop to
start) is imported only after the command line has parsed, so ``--help``, ``--version`` and
usage errors touch no D-Bus code at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from .exitcodes import ExitCode

EXIT_CODES = """\
exit codes: 0 success, 1 failed, 2 usage or invalid argument, 3 refused by the guard,
4 busy (leased, or held by a VM), 5 not authorized, 6 nicpassd not reachable, 7 not found, 8 (check) a finding failed."""
DEVICE_NOTE = "DEVICE is a PCI address (0000:3b:00.0 or 3b:00.0) or a network interface name."
EPILOG = f"{EXIT_CODES}\n{DEVICE_NOTE}"
DEVICE_HELP = "a PCI address (0000:3b:00.0 or 3b:00.0) or a network interface name"
# nicpassctl COMMAND --help ends with these (what a new admin types first)
EXAMPLES = {
    "list": ["nicpassctl list", "nicpassctl --json list --all"],
    "show": ["nicpassctl show enp59s0f0", "nicpassctl show 3b:02.0"],
    "vfs": ["nicpassctl vfs enp59s0f0 8                 # persisted: back at every boot",
            "nicpassctl vfs enp59s0f0 8 --vfio --stable-macs", "nicpassctl vfs enp59s0f0 0"],
    "bind": ["nicpassctl bind 3b:02.0 3b:02.1           # to vfio-pci, persisted",
             "nicpassctl bind --group af:00.0 --runtime  # with its IOMMU group mates, until reboot"],
    "unbind": ["nicpassctl unbind 3b:02.0", "nicpassctl unbind --group af:00.0"],
    "forget": ["nicpassctl forget 0000:3b:02.0            # also a device that is gone",
               "nicpassctl forget 3c:fd:fe:a0:00:00       # a card taken out, by the MAC check shows",
               "nicpassctl forget 3b:02.0 --restore"],
    "reconcile": ["nicpassctl reconcile --plan", "nicpassctl reconcile"],
    "guard": ["nicpassctl guard", "nicpassctl guard --release 0000:01:00.0"],
    "import": ["nicpassctl import                 # what would be adopted; changes nothing",
               "nicpassctl import --apply         # then remove the lines it lists"],
    "leases": ["nicpassctl leases", "nicpassctl --json leases"],
    "release": ["nicpassctl release 6f1c2a8e-0000-4000-8000-000000000001"],
    "activate": ["nicpassctl activate 6f1c2a8e-0000-4000-8000-000000000001 --pid 4242"],
}


def client_version() -> str:
    from . import __version__

    return __version__


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"nicpassctl {client_version()}")
        parser.exit(0)


def _count(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"COUNT must be a non-negative integer, not {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"COUNT must be a non-negative integer, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"--timeout must be a positive number of seconds, not {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with a did-you-mean for a mistyped command (`nicpassctl lsit`) and unique
    prefixes of commands (``_Commands``)."""

    def _check_value(self, action, value):
        if isinstance(action, _Commands):
            name, ambiguous = action.expand(value)
            if ambiguous:
                self.error(f"argument COMMAND: {value!r} is ambiguous: it may be {', '.join(ambiguous)}")
            value = name
        return super()._check_value(action, value)

    def error(self, message: str):
        if "invalid choice:" in message:
            import difflib
            import re

            wrong = re.search(r"invalid choice: '([^']*)'", message)
            choices = re.findall(r"'([^']*)'", message.split("choose from", 1)[-1])
            close = difflib.get_close_matches(wrong.group(1), choices, n=1) if wrong else []
            if close:
                message = f"{message.split(' (choose from', 1)[0]}; did you mean {close[0]!r}?"
        super().error(message)


class _Commands(argparse._SubParsersAction):
    """A command may be shortened to any prefix that names one command only, as `ip` and `nmcli`
    allow (`nicpassctl li`, `nicpassctl rec --plan`); an exact name wins (`vf`, not `vfs`)."""

    def expand(self, name: str) -> tuple[str, list[str]]:
        """(the command ``name`` stands for, or ``name`` itself; the candidates when ambiguous)."""
        if name in self._name_parser_map or not name:
            return name, []
        matches = sorted(choice for choice in self._name_parser_map if choice.startswith(name))
        return (matches[0], []) if len(matches) == 1 else (name, matches)

    def __call__(self, parser, namespace, values, option_string=None):
        name, *rest = values
        super().__call__(parser, namespace, [self.expand(name)[0], *rest], option_string)


def _translate_once() -> None:
    """argparse translates ~50 strings while it builds the parser, and gettext looks for its
    catalogue on disk at every call (4 stat()s each; a missing catalogue is not remembered).
    The answer cannot change within one command: asked once per string."""
    translate = getattr(argparse, "_", None)
    if callable(translate) and not hasattr(translate, "cache_info"):
        import functools

        argparse._ = functools.lru_cache(maxsize=None)(translate)


def build_parser() -> argparse.ArgumentParser:
    _translate_once()
    parser = _Parser(
        prog="nicpassctl",
        description="Control nicpassd: safe NIC PCI passthrough to virtual machines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the client version and exit")
    parser.add_argument("-j", "--json", action="store_true", default=False, help="print JSON for scripts")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="print nothing on success (errors still go to stderr; the exit code says it all)")
    parser.add_argument("--bus-address", metavar="ADDR", default=None,
                        help="D-Bus address of the system bus, a unix: one (default: $DBUS_SYSTEM_BUS_ADDRESS or "
                             "the standard socket)")
    parser.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=None,
                        help="how long to wait for nicpassd (default: 25 s for queries, 300 s for changes)")
    parser.add_argument("--no-ask-password", dest="interactive", action="store_false", default=True,
                        help="do not let polkit ask for a password for changes")
    parser.register("action", "parsers", _Commands)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, *, devices: bool = False) -> argparse.ArgumentParser:
        examples = "".join(f"\n  {example}" for example in EXAMPLES.get(name, ()))
        p = sub.add_parser(name, help=help_text, description=help_text + (f"\n\nexamples:{examples}" if examples else ""),
                           epilog=EPILOG if devices else EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
        # --json is accepted after the command too; SUPPRESS keeps the global value otherwise
        p.add_argument("-j", "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts")
        return p

    p = command("list", "list network functions (VFs under their PF)")
    p.add_argument("--all", action="store_true", help="also list IOMMU group mates that are not NICs")
    p = command("show", "one device in full, with why it may or may not be passed through", devices=True)
    p.add_argument("device", metavar="DEVICE", help=DEVICE_HELP)
    p = command("check", "preflight: what passthrough needs of this host and its devices, with a remedy for each "
                         "problem (exit 8 if a finding is fail)", devices=True)
    p.description = (p.description + "\n\nexamples:\n  nicpassctl check                 # the host: CPU, IOMMU, "
                     "interrupt remapping, vfio, kernel command line, management path\n"
                     "  nicpassctl check enp59s0f0 3b:02.0   # and these devices: IOMMU group, reset, SR-IOV, guard\n"
                     "  nicpassctl check --devices       # and every NIC function")
    p.add_argument("device", metavar="DEVICE", nargs="*", help="devices to check for passthrough readiness")
    p.add_argument("--devices", action="store_true", help="check every NIC function too")
    p = command("vfs", "set the number of SR-IOV VFs of a PF (0 removes them)", devices=True)
    p.add_argument("device", metavar="DEVICE", help="the PF: " + DEVICE_HELP)
    p.add_argument("count", metavar="COUNT", type=_count, help="how many VFs (0 to TotalVfs)")
    p.add_argument("--runtime", action="store_true", help="change it now only; do not persist")
    p.add_argument("--vfio", action="store_true", help="bind the new VFs to vfio-pci")
    macs = p.add_mutually_exclusive_group()
    macs.add_argument("--stable-macs", dest="stable_macs", action="store_const", const=True, default=None,
                      help="give every VF a MAC derived from the PF's and its index, the same after every reboot")
    macs.add_argument("--no-stable-macs", dest="stable_macs", action="store_const", const=False,
                      help="stop deriving the VFs' MACs (the MACs set stay until the VFs are re-created)")
    p.add_argument("--force", action="store_true",
                   help="override a guard protection that is not on the management path (asks for "
                        "org.nicpass.NicPass1.force; logged)")
    p = command("vf", "set a VF's MAC, VLAN, trust, spoof check, rates or link state (as `ip link set PF vf N`)", devices=True)
    p.description = (p.description + "\n\nsettings: mac M | vlan N [qos Q] [proto 802.1Q|802.1ad] | trust on|off | "
                     "spoofchk on|off | max-rate MBPS | min-rate MBPS | state auto|enable|disable\n"
                     "examples:\n  nicpassctl vf enp59s0f0:0 mac 02:11:22:33:44:55 trust on\n"
                     "  nicpassctl vf 3b:02.1 vlan 100 qos 3 spoofchk off --runtime")
    p.add_argument("device", metavar="DEVICE", help="the VF, or its PF and index as PF:N")
    p.add_argument("settings", metavar="SETTING VALUE", nargs="+", type=str, help="one or more pairs, as above")
    p.add_argument("--runtime", action="store_true", help="change it now only; do not persist")
    p.add_argument("--force", action="store_true",
                   help="override a guard protection that is not on the management path (asks for "
                        "org.nicpass.NicPass1.force; logged)")
    p = command("bind", "bind functions to a driver (default vfio-pci)", devices=True)
    p.add_argument("device", metavar="DEVICE", nargs="+", help=DEVICE_HELP)
    p.add_argument("--driver", default="vfio-pci",
                   help='driver to bind to (default vfio-pci; "" means the host driver)')
    p.add_argument("--runtime", action="store_true", help="bind now only; do not persist")
    p.add_argument("--force", action="store_true",
                   help="override a guard protection that is not on the management path (asks for "
                        "org.nicpass.NicPass1.force; logged)")
    p.add_argument("--group", action="store_true",
                   help="bind the device's IOMMU group mates too (refused if any is protected)")
    p = command("unbind", "give functions back to their host driver (and forget the persisted binding)", devices=True)
    p.add_argument("device", metavar="DEVICE", nargs="+", help=DEVICE_HELP)
    p.add_argument("--runtime", action="store_true", help="keep the persisted binding")
    p.add_argument("--group", action="store_true",
                   help="also give back its IOMMU group mates (what bind --group took)")
    p = command("forget", "drop the persisted desired state of a device", devices=True)
    p.add_argument("device", metavar="DEVICE", help=DEVICE_HELP + "; for a device that is gone, also the "
                   "permanent MAC or PCIe serial it was recorded with (`nicpassctl check` shows them)")
    p.add_argument("--restore", action="store_true", help="also give it back to its host driver now")
    p = command("reconcile", "apply the persisted desired state now; lists each step and what was not applied "
                             "(exit 1 if a step failed or was refused; devices left alone on purpose, such as "
                             "--runtime changes, do not count)")
    p.add_argument("--plan", action="store_true",
                   help="only say what it would do and what it would not apply; change nothing (exit 1 if a "
                        "desire would not be applied)")
    p = command("import", "adopt what driverctl, vfio-pci.ids=, systemd-networkd [SR-IOV] and udev sriov_numvfs "
                          "rules do at boot: shows each line as a nicpassd desire, guard-checked, and what to "
                          "remove from the old tool (exit 1 if something would be refused or, with --apply, failed)")
    p.add_argument("--apply", action="store_true",
                   help="persist what can be adopted (the kernel changes only where it differs); the old "
                        "configuration is left for you to remove")
    p = command("guard", "the protected set (never handed to a VM) with reasons")
    p.add_argument("--release", metavar="DEVICE", default=None,
                   help="forget a device remembered as the management path that the kernel no longer shows "
                        "there (asks for org.nicpass.NicPass1.force; logged)")
    command("leases", "current leases of devices to VMs")
    p = command("prepare", "lease devices to a VM about to start (what the hooks do)", devices=True)
    p.description = (p.description + "\n\nexample: a VF with the VM's own MAC and VLAN, put back as they were "
                     "at release:\n  nicpassctl prepare web01 UUID 3b:02.0 --vf '3b:02.0 mac 52:54:00:12:34:56 "
                     "vlan 100'")
    p.add_argument("vm_name", metavar="VM_NAME", help="the VM's name (libvirt domain name, Proxmox name)")
    p.add_argument("vm_uuid", metavar="VM_UUID", help="the VM's UUID")
    p.add_argument("device", metavar="DEVICE", nargs="+", help=DEVICE_HELP)
    p.add_argument("--vf", metavar="'VF SETTING VALUE...'", action="append", default=[],
                   help="settings of one leased VF for this VM only, as for `nicpassctl vf` (repeat per VF)")
    p = command("activate", "tie a VM's lease to the running VM (what the hooks do once it started)")
    p.add_argument("vm_uuid", metavar="VM_UUID", help="the VM's UUID")
    p.add_argument("--pid", type=_count, default=0,
                   help="the VM's QEMU process: its exit then ends the lease even without a release")
    p = command("release", "end the leases of a VM that stopped (what the hooks do)")
    p.add_argument("vm_uuid", metavar="VM_UUID", help="the VM's UUID")
    command("monitor", "print device and lease events until interrupted")
    command("version", "client and daemon versions")
    return parser


ClientFactory = Callable[[argparse.Namespace], Any]


def _default_client(args: argparse.Namespace):
    from .connection import Client

    return Client(bus_address=args.bus_address, timeout=args.timeout, interactive=args.interactive)


def _report(sentence: str) -> None:
    from .errors import printable

    print(printable(f"nicpassctl: {sentence}", sys.stderr), file=sys.stderr, flush=True)


def _fail(args: argparse.Namespace, err, exc: BaseException) -> int:
    """The failure's sentence on stderr; with --json also as an object on stdout (a script reading
    stdout gets it there too); the exit code unchanged."""
    _report(err.sentence)
    if getattr(args, "json", False):
        import json

        print(json.dumps({"error": getattr(exc, "name", None), "message": err.sentence,
                          "exit_code": int(err.code)}), flush=True)
    return int(err.code)


def run(args: argparse.Namespace, client_factory: ClientFactory | None = None) -> int:
    """Connect, run the command, map any failure to (sentence on stderr, exit code)."""
    from .commands import COMMANDS, action_for
    from .errors import CliError, StdoutClosed, from_exception

    client = (client_factory or _default_client)(args)
    try:
        client.connect()
    except Exception as exc:  # noqa: BLE001 - every connection failure is reported the same way
        if type(exc).__name__ == "InvalidAddressError" and args.bus_address:
            err = CliError(ExitCode.USAGE, f"invalid --bus-address {args.bus_address!r}: {exc}")
        else:
            err = from_exception(exc)
        return _fail(args, err, exc)
    try:
        return int(COMMANDS[args.command](client, args))
    except StdoutClosed:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one sentence; unknown ones become exit 1
        return _fail(args, from_exception(exc, action_for(args)), exc)
    finally:
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass


def main(argv: Sequence[str] | None = None, client_factory: ClientFactory | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (2), --help/--version (0)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else ExitCode.USAGE
    try:
        if args.quiet and not args.json:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # the results; stderr keeps every failure
                return run(args, client_factory)
        return run(args, client_factory)
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    except Exception as exc:
        from .errors import StdoutClosed

        if not isinstance(exc, StdoutClosed):
            raise
        # The reader is gone: exit quietly, as ip and systemctl do, and keep the interpreter's
        # final flush of stdout from reporting the same broken pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
