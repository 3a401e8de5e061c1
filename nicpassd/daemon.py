"""nicpassd: wiring. Arguments, logging, the host (real or simulated), engine, bus, signals, sd_notify."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from nicpassd import __version__
from nicpassd.arguments import parse_args
from nicpassd.engine.config import ConfigError, load_config
from nicpassd.engine.engine import Engine
from nicpassd.engine.store import StateStoreError
from nicpassd.host.events import on_loop
from nicpassd.host.host import Host
from nicpassd.host.writer import SysfsWriter
from nicpassd.paths import ROOT_ENV, HostPaths
from nicpassd.service_manager import Notifier, setup_logging

log = logging.getLogger("nicpassd")
EXIT_CONFIG = 78  # EX_CONFIG: systemd shows it as a configuration problem


def main(argv: list[str] | None = None) -> int:
    """The daemon without the early VFs of ``nicpassd.start`` (which the ``nicpassd`` command runs)."""
    return run_parsed(parse_args(argv), [])


def run_parsed(args: argparse.Namespace, early: list[str]) -> int:
    """``early``: what ``nicpassd.host.early_vfs`` did before this module was imported, logged once
    logging is set up."""
    if args.check_config is not None:
        return check_config(Path(args.check_config) if args.check_config else
                            HostPaths(args.root or Path(os.environ.get(ROOT_ENV, "/"))).config_file)
    if args.record_topology:
        from nicpassd.sim.recorder import record_to

        return record_to(HostPaths(args.root or Path(os.environ.get(ROOT_ENV, "/"))), args.record_topology)
    try:
        return asyncio.run(run(args, early))
    except KeyboardInterrupt:
        return 130


def check_config(path: Path) -> int:
    """``nicpassd --check-config``: what a reload would say, before the reload (``nginx -t``)."""
    if not path.exists():
        print(f"{path}: no such file; nicpassd runs with the defaults")
        return 0
    try:
        load_config(path)
    except ConfigError as exc:
        for line in [problem.describe(path) for problem in exc.problems] or [str(exc)]:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok")
    return 0


async def run(args: argparse.Namespace, early: list[str]) -> int:
    temporary_root = None
    root = args.root or Path(os.environ.get(ROOT_ENV, "/"))
    if args.simulate is not None and args.root is None:
        temporary_root = Path(tempfile.mkdtemp(prefix="nicpassd-sim-"))
        root = temporary_root
    paths = HostPaths(root)
    # A reload asked for from here to the reload handler (the start: seconds under emulation) is
    # done once the daemon is ready; the configuration may change after this read.
    hups: list[int] = []
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hups.append, signal.SIGHUP)
    try:
        config = load_config(paths.config_file)
    except ConfigError as exc:
        print(f"nicpassd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level or config.daemon.log_level)
    _log_early(early)
    try:
        return await serve(args, paths, config, hups)
    finally:
        if temporary_root is not None:
            shutil.rmtree(temporary_root, ignore_errors=True)


async def serve(args, paths: HostPaths, config, hups: list[int]) -> int:
    # The D-Bus layer before the boot reconcile, not after: importing it then would compete for
    # the CPU with udev's work on the new VFs and delay READY, which VMs that autostart wait for
    # (measured in the e2e guest: READY 0.9 s later, devices bound 1 s earlier).
    from dbus_fast.errors import AuthError

    from nicpassd.transport.service import ServiceError, start_service

    loop = asyncio.get_running_loop()
    notifier = Notifier()
    kernel = None
    if args.simulate is not None:
        from nicpassd.sim.topology import TopologyError, load_topology

        try:
            topology = load_topology(args.simulate or None)
        except TopologyError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        kernel = writer = _simulated_kernel(args, paths, topology)
        log.info("simulating %s under %s", topology.description or "a host", paths.root)
        from nicpassd.host.early_vfs import create_persisted_vfs

        _log_early(create_persisted_vfs(paths.root, kernel))  # as nicpassd.start does on a real host
    else:
        writer = SysfsWriter()
    host = Host(paths, writer, write_timeout=config.daemon.write_timeout)
    try:
        engine = Engine.open(host, config)
    except StateStoreError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    # The first read of the kernel is _apply_desired_state's, once events are subscribed to.

    if kernel is not None:
        kernel.subscribe(on_loop(loop, engine.on_uevent))
        events = None
    else:
        from nicpassd.host.udev import UdevEvents

        from nicpassd.host.netlink import RtnlEvents

        events = UdevEvents(loop, engine.on_uevent)
        # The kernel's own PCI uevents, before udev's rules ran (under a hypervisor udev takes
        # 100+ ms per event): only the sentinel's first look at a management device taken by
        # someone else, whose outage lasts until the heal (the inventory waits for udev's).
        try:
            first_events = UdevEvents(loop, engine.on_kernel_event, source="kernel", subsystems=("pci",))
        except Exception as exc:  # noqa: BLE001 - pyudev's own errors; udev's events still come
            log.warning("cannot read the kernel's own uevents (%s); a heal waits for udev's", exc)
            first_events = None
        # Routes, addresses and links move the protected set: netlink pushes each change; so does
        # sock_diag for a closed session (the admin's way in).
        routing = RtnlEvents(loop, engine.on_uevent)
        try:
            from nicpassd.host.sessions import SessionEvents

            closed_sessions = SessionEvents(loop, engine.on_uevent)
        except OSError as exc:
            log.warning("cannot follow closed TCP sessions over sock_diag (%s); they are seen at the next refresh",
                        exc)
            closed_sessions = None
        from nicpassd.host.storage import MountEvents

        mounts = MountEvents(loop, engine.on_uevent, paths)  # a network mount that goes stops protecting

    await _apply_desired_state(engine)  # before owning the name: VMs started after us find their NICs
    engine.leasing.start()  # leases survive a restart: re-arm expiry timer and QEMU pidfds (after recovery)

    try:
        bus = await start_service(engine, args.bus_address)
    except ServiceError as exc:
        log.error("%s", exc)
        return 1
    except (OSError, AuthError) as exc:  # no bus (yet): systemd's Restart= tries again
        log.error("cannot connect to the system bus %s: %s", args.bus_address or
                  os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket"), exc)
        return 1

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        task = loop.create_task(_reload(engine, paths, args.log_level))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    if hups:
        log.info("a reload was asked for during the start: reloading")
        reload()
    functions = len(engine.views)
    log.info("nicpassd %s ready: %d PCI functions, %d protected", __version__, functions, len(engine.protected.entries))
    notifier.ready(f"managing {functions} PCI functions")
    watchdog = notifier.start_watchdog(loop)

    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    notifier.stopping()
    engine.leasing.close()
    engine.sentinel.close()
    if watchdog is not None:
        watchdog.cancel()
    if events is not None:
        events.close()
        if first_events is not None:
            first_events.close()
        routing.close()
        if closed_sessions is not None:
            closed_sessions.close()
        mounts.close()
    if disconnected.done():
        log.error("lost the D-Bus connection; exiting so systemd restarts us")
        return 1
    disconnected.cancel()
    bus.disconnect()
    log.info("nicpassd stopped")
    return 0


def _log_early(lines: list[str]) -> None:
    for line in lines:
        log.info("VFs at start, before the engine: %s", line)


def _simulated_kernel(args, paths: HostPaths, topology):
    """The simulated kernel: in-process (each daemon start is a boot: the tree is rebuilt, /run is
    emptied), or with --keep-kernel a kernel_server process that outlives the daemon (a daemon
    start is a boot only when that process had to be started). Either runs the early-binding
    udev helper on "add", as a host with packaging/udev installed does."""
    from nicpassd.host.early_binding import udev_rule
    from nicpassd.sim import kernel_server
    from nicpassd.sim.kernel import SimKernel

    if args.keep_kernel:
        if args.root is None:
            raise SystemExit("nicpassd: --keep-kernel needs --root DIR (where the kernel keeps running)")
        if not kernel_server.alive(paths):
            shutil.rmtree(paths.runtime_dir, ignore_errors=True)  # a simulated boot: /run is empty
            pid = kernel_server.spawn(paths, args.simulate or None)
            log.info("started the simulated kernel (pid %d) for %s", pid, paths.root)
        else:
            log.info("attached to the running simulated kernel of %s (a daemon restart, not a boot)", paths.root)
        return kernel_server.RemoteKernel(paths)
    shutil.rmtree(paths.runtime_dir, ignore_errors=True)  # a simulated boot: /run is empty
    return SimKernel(paths, topology, rules=(udev_rule,))


async def _apply_desired_state(engine: Engine) -> None:
    """At start: roll back what a crash interrupted (undo journal), then the boot reconcile; from
    then on the engine reconciles on uevents and after API calls."""
    from nicpassd.engine.recovery import recover
    from nicpassd.engine.results import Action, Result

    engine.refresh()  # after subscribing to events: nothing that happens from here is missed
    for line in await recover(engine.view, engine.ops):
        log.warning("undo journal: %s", line)
    # A device of the management path found taken at start (vfio-pci.ids=, a softdep in the
    # initramfs, a crash mid-way) is given back before anything else is applied.
    engine.sentinel.start_healing()
    await engine.sentinel.idle()
    engine.reconciler.auto = True
    outcomes = await engine.reconciler.run(explicit=False)
    await engine.reconciler.idle()  # the follow-up run its uevents queued: inventory and views current
    failed = [o for o in outcomes if o.action in (Action.VFS, Action.BIND) and o.result is Result.FAILED]
    applied = [o for o in outcomes if o.action is not Action.CHECK and o.succeeded]
    if applied or failed:
        log.info("boot reconcile: %d step(s) applied, %d failed", len(applied), len(failed))


async def _reload(engine: Engine, paths: HostPaths, log_level_argument: str | None) -> None:
    """SIGHUP: read the configuration again and apply every setting that can change at run
    time (guard, release policy, timeouts, the log level unless --log-level fixed it), under
    the mutation lock. A bad file changes nothing."""
    try:
        config = load_config(paths.config_file)
    except ConfigError as exc:
        log.critical("reload failed, keeping the previous configuration: %s", exc)
        engine.reject_config(str(exc))
        return
    if log_level_argument is None:
        logging.getLogger().setLevel(config.daemon.log_level.upper())
    await engine.reconfigure(config)
    log.info("configuration reloaded")


if __name__ == "__main__":
    sys.exit(main())
