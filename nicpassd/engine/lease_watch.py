"""Stale leases reclaimed without polling: the reservation expiry timer and the QEMU pidfds.

- reservations: one ``loop.call_at`` for the earliest expiry, re-armed after every change (a
  reservation whose VM is running anyway, found by its pidfile, is adopted instead);
- running VMs: a pidfd per QEMU process (``Host.open_pidfd``) watched with ``loop.add_reader``, so
  the exit of the process wakes the daemon; a PID reused by another process (its start time
  differs) counts as gone.

It ends leases through the keeper (``leasing.LeaseKeeper``): the same release policy, lock and
announcements as a Release.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Protocol

from nicpassd.engine.leases import ACTIVE, BROKEN, Lease, LeaseTable
from nicpassd.engine.operations import Operations
from nicpassd.host.host import Host

log = logging.getLogger(__name__)

STATE_EXPIRED = "expired"  # a reservation whose VM never started in time
STATE_VM_GONE = "vm-gone"  # the QEMU process exited without a Release


class Keeper(Protocol):
    """What of ``leasing.LeaseKeeper`` (which owns this watch) the reclaiming uses."""

    table: LeaseTable
    host: Host
    ops: Operations

    async def _end_all(self, leases: list[Lease]) -> list[Lease]: ...

    def _settle(self, *device_lists) -> None: ...

    async def _tie(self, lease: Lease, pid: int) -> None: ...

    def announce(self, lease: Lease, state: str) -> None: ...


class LeaseWatch:
    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._watches: dict[str, tuple[int, int]] = {}  # lease_id -> (pidfd, pid)
        self._tasks: set[asyncio.Task] = set()

    @property
    def table(self):
        return self.keeper.table

    def start(self) -> None:
        """After a daemon start: re-arm the expiry timer and a pidfd per running VM; leases whose
        VM is gone (or whose reservation expired meanwhile) are reclaimed right away."""
        leases = list(self.table.leases.values())
        if leases:
            log.info("resuming %d lease(s) from %s", len(leases), self.table.path)
        self.arm()

    def arm(self) -> None:
        """Bring the timer and the pidfd watches in line with the table. Cheap; call after changes."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop is not loop:
            self._forget_loop()
            self._loop = loop
        wanted = {lease.lease_id: lease for lease in self.table.leases.values()
                  if lease.state in (ACTIVE, BROKEN) and lease.pid}
        for lease_id, (fd, pid) in list(self._watches.items()):
            lease = wanted.get(lease_id)
            if lease is None or lease.pid != pid:
                self._unwatch(lease_id)
        for lease in wanted.values():
            if lease.lease_id not in self._watches:
                self._watch(lease)
        when = self.table.next_expiry()
        if when == self._timer_at and (self._timer is not None or not when):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when:
            delay = max(0.0, when - time.time())
            self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def close(self) -> None:
        """Stop watching (daemon shutdown). Leases stay in the table for the next start."""
        self._forget_loop()
        for task in list(self._tasks):
            task.cancel()

    def _forget_loop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, 0.0
        for lease_id in list(self._watches):
            self._unwatch(lease_id)
        self._loop = None

    def _watch(self, lease: Lease) -> None:
        try:
            fd = self.keeper.host.open_pidfd(lease.pid)
        except ProcessLookupError:
            self._spawn(self._reclaim_gone(lease.lease_id, lease.pid))
            return
        except OSError as exc:  # no pidfd (kernel < 5.3): the lease ends with Release only
            log.warning("cannot watch QEMU pid %d of VM %s (%s); its lease ends with Release only",
                        lease.pid, lease.vm_uuid, exc.strerror)
            return
        if lease.pid_start and self.keeper.host.process_start_time(lease.pid) != lease.pid_start:
            os.close(fd)  # the PID was reused by another process: the VM is gone
            self._spawn(self._reclaim_gone(lease.lease_id, lease.pid))
            return
        assert self._loop is not None
        self._watches[lease.lease_id] = (fd, lease.pid)
        self._loop.add_reader(fd, self._on_exit, lease.lease_id, lease.pid)

    def _unwatch(self, lease_id: str) -> None:
        fd, _pid = self._watches.pop(lease_id)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        os.close(fd)

    def _on_exit(self, lease_id: str, pid: int) -> None:
        if lease_id in self._watches:
            self._unwatch(lease_id)
        self._spawn(self._reclaim_gone(lease_id, pid))

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, 0.0
        self._spawn(self._reclaim_expired())

    def _spawn(self, coroutine) -> None:
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reclaiming a lease failed", exc_info=task.exception())

    async def _reclaim_gone(self, lease_id: str, pid: int) -> None:
        async with self.keeper.ops.lock:
            lease = self.table.leases.get(lease_id)
            if lease is None or lease.pid != pid:
                return  # released or re-tied meanwhile
            await self.keeper._end_all([lease])
            self.keeper._settle(lease.devices)
        log.warning("VM %s (%s): QEMU process %d exited without a release; reclaimed %s",
                    lease.vm_name, lease.vm_uuid, pid, ", ".join(lease.devices))
        self.keeper.announce(lease, STATE_VM_GONE)
        self.arm()

    async def _reclaim_expired(self) -> None:
        ended: list[Lease] = []
        adopted: list[Lease] = []
        async with self.keeper.ops.lock:
            for lease in self.table.expired(time.time()):
                # A VM that started while the hook could not reach us (or whose start outlasted the
                # reservation) is running: adopt its QEMU process rather than pull its devices.
                pid = self.keeper.host.read_pidfile(lease.pidfile, not_before=lease.created - 5) if lease.pidfile else 0
                if pid:
                    await self.keeper._tie(lease, pid)
                    adopted.append(lease)
                    continue
                ended.extend(await self.keeper._end_all([lease]))
            if ended:
                self.keeper._settle(*(lease.devices for lease in ended))
        for lease in adopted:
            log.info("VM %s (%s): reservation expired but QEMU pid %d runs; lease active",
                     lease.vm_name, lease.vm_uuid, lease.pid)
            self.keeper.announce(lease, lease.state)
        for lease in ended:
            log.warning("VM %s (%s): reservation expired (the VM did not start); reclaimed %s",
                        lease.vm_name, lease.vm_uuid, ", ".join(lease.devices))
            self.keeper.announce(lease, STATE_EXPIRED)
        self.arm()
