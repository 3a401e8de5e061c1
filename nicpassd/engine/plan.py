"""The reconcile plan: pure functions from desired state and a host snapshot to what to do.

``make_plan`` turns the persisted desires into explicit, printable ``Step``s (``vfs``: set a PF's
VF count; ``bind``: move a function to its desired driver) and, for each desire it does *not*
apply, a ``StepOutcome`` saying why: the device is not the one persisted (``IdentityChanged``),
protected by the guard (``Protected``), leased (``Busy``), changed with ``--runtime``, absent, or
held after a failure. ``find_moves`` finds persisted cards that moved to another address.
Nothing here touches the kernel or the files.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Container

from nicpassd.engine.guard import ProtectedSet, refuse_if_protected
from nicpassd.engine.results import SKIPPED, Action, Result, StepOutcome
from nicpassd.engine.store import DeviceDesire, identity_of
from nicpassd.engine.vf_settings import desired_settings
from nicpassd.errors import Protected
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS
from nicpassd.host.model import HostSnapshot, PciFunction


@dataclass(frozen=True)
class Step:
    address: str
    action: Action  # FOLLOW, VFS, BIND
    text: str
    count: int = 0
    driver: str = ""
    target: str = ""  # follow: the new address
    pf: str = ""  # bind of a VF: its PF (the VFs of one PF are bound in one batch)
    # vfs: single VFs persisted on a passthrough driver, (VF index, driver): created with the
    # PF's autoprobe off and bound explicitly (docs/kernel-rules.md §5), never raced by their host driver
    vf_drivers: tuple[tuple[int, str], ...] = ()
    settings: tuple[tuple[str, object], ...] = ()  # vf: (setting, value) to write, VF index in count
    # vfs: the persisted settings of the VFs it creates, (VF index, settings), written before they probe
    vf_settings: tuple[tuple[int, tuple[tuple[str, object], ...]], ...] = ()

    def __str__(self) -> str:
        return f"{self.address}  {self.action.value:<6} {self.text}"


def not_applied(address: str, action: Action, error: str, message: str) -> StepOutcome:
    """A desire that is not applied, and why. ``error`` is an error name of the contract where one
    fits (IdentityChanged, Protected, Busy, NotSupported, InvalidArgument, NotFound, KernelError),
    else ``SKIPPED``."""
    return StepOutcome(address, action, Result.NOT_APPLIED, error, message)


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    refusals: list[StepOutcome] = field(default_factory=list)  # desires not applied, and why

    def __str__(self) -> str:
        lines = [f"reconcile plan: {len(self.steps)} step(s)"]
        lines += [f"  {step}" for step in self.steps]
        lines += [f"  {refusal}" for refusal in self.refusals]
        return "\n".join(lines)

    def batches(self) -> list[list[Step]]:
        """Steps in order, the consecutive binds of one PF's VFs to one driver grouped, and the
        consecutive settings of one PF's VFs."""
        batches: list[list[Step]] = []
        for step in self.steps:
            last = batches[-1] if batches else None
            if (last is not None and step.action in (Action.BIND, Action.VF) and step.pf
                    and last[0].action is step.action and last[0].pf == step.pf and last[0].driver == step.driver):
                last.append(step)
            else:
                batches.append([step])
        return batches


def _label(function: PciFunction) -> str:
    return f"{function.address} ({', '.join(function.interfaces)})" if function.interfaces else function.address


def satisfied(function: PciFunction, driver: str) -> bool:
    """Is ``function`` on ``driver`` the way a verified bind leaves it (override included)?"""
    if driver in PASSTHROUGH_DRIVERS:
        return function.driver == driver and function.driver_override == driver
    return function.driver == driver


def desired_driver(snapshot: HostSnapshot, desires: dict[str, DeviceDesire], address: str) -> tuple[str, str]:
    """(driver, address of the desire it comes from): its own, or for a VF its PF's ``vf_driver``."""
    own = desires.get(address)
    if own is not None and own.driver:
        return own.driver, address
    function = snapshot.functions.get(address)
    if function is not None and function.physfn:
        parent = desires.get(function.physfn)
        if parent is not None and parent.vf_driver:
            return parent.vf_driver, function.physfn
    return "", ""


def vf_claims(desires: dict[str, DeviceDesire], pf: str, count: int) -> tuple[tuple[int, str], ...]:
    """(index, driver) of the VF desires of ``pf`` on a passthrough driver among its first ``count``."""
    return tuple(sorted((desire.identity.vf_index, desire.driver) for desire in desires.values()
                        if desire.identity.physfn == pf and desire.driver in PASSTHROUGH_DRIVERS
                        and 0 <= desire.identity.vf_index < count))


def _held(label: str, holds: Container[str], address: str) -> str:
    why = holds.get(address, "runtime") if isinstance(holds, dict) else "runtime"
    if why == "runtime":
        return f"{label} was changed with --runtime; left as it is until it is re-plugged or the host reboots"
    return f"{label} is left as it is: {why}"


def make_plan(snapshot: HostSnapshot, desires: dict[str, DeviceDesire], protected: ProtectedSet,
              leased: dict[str, str], holds: Container[str], blocked: dict[str, str]) -> Plan:
    """Pure: what to do to bring the kernel to ``desires``, and what not to do, and why."""
    plan = Plan()
    refused: set[str] = set()  # desires not applied: the VFs inheriting from them are not either
    recreating: set[str] = set()  # PFs whose VFs a step re-creates: their binds wait a pass

    def guard_problem(address: str, action: str) -> str:
        try:
            refuse_if_protected(protected, address, action)
        except Protected as exc:
            return exc.message
        return ""

    def refuse(address: str, action: Action, error: str, message: str) -> None:
        plan.refusals.append(not_applied(address, action, error, message))
        refused.add(address)

    for address, desire in desires.items():
        function = snapshot.functions.get(address)
        if function is None:
            if not desire.identity.physfn:  # a VF desire waits for its PF to create the VF
                refuse(address, Action.CHECK, "NotFound", f"persisted device {address} is not present")
            continue
        label = _label(function)
        changed = desire.identity.mismatch(identity_of(function, snapshot))
        if changed:
            refuse(address, Action.CHECK, "IdentityChanged",
                   f"{label} is not the device that was persisted ({changed}); its desired state is kept, "
                   f"not applied: `nicpassctl forget {address}` if the card was replaced on purpose")
            continue
        if address in holds:
            refuse(address, Action.CHECK, SKIPPED, _held(label, holds, address))
            continue
        if address in blocked:
            refuse(address, Action.CHECK, SKIPPED, blocked[address])
            continue
        if desire.num_vfs is None or desire.num_vfs == function.num_vfs:
            continue
        action = f"change the VF count of {label}"
        problem = guard_problem(address, action)
        if problem:
            refuse(address, Action.VFS, "Protected", problem)
        elif not function.sriov_capable:
            refuse(address, Action.VFS, "NotSupported", f"{label} is not an SR-IOV physical function")
        elif desire.num_vfs > function.total_vfs:
            refuse(address, Action.VFS, "InvalidArgument",
                   f"{label} supports at most {function.total_vfs} VFs; {desire.num_vfs} are persisted")
        elif any(member in leased for member in (address, *function.virtfns)):
            vm = next(leased[m] for m in (address, *function.virtfns) if m in leased)
            refuse(address, Action.VFS, "Busy", f"cannot {action}: a VF is leased to VM {vm}")
        else:
            where = f" on {desire.vf_driver}" if desire.vf_driver and desire.num_vfs else ""
            vf_drivers = () if desire.vf_driver in PASSTHROUGH_DRIVERS else vf_claims(desires, address, desire.num_vfs)
            if vf_drivers:
                where += " (" + ", ".join(f"VF {index} on {driver}" for index, driver in vf_drivers) + ")"
            settings = tuple((index, tuple(wanted.items())) for index, wanted in sorted(desired_settings(
                desire, desire.identity.permanent_mac or function.permanent_mac, desire.num_vfs).items())
                if index < desire.num_vfs and wanted)
            if settings:
                where += f", settings of {len(settings)} VF(s)"
            plan.steps.append(Step(address, Action.VFS, f"{function.num_vfs} → {desire.num_vfs} VFs{where}",
                                   count=desire.num_vfs, driver=desire.vf_driver, vf_drivers=vf_drivers,
                                   vf_settings=settings))
            recreating.add(address)

    for address, desire in desires.items():
        if (desire.vf_settings or desire.stable_macs) and address not in refused and address not in recreating:
            _plan_vf_settings(plan, snapshot, address, desire, leased, holds, blocked, guard_problem)

    for address, function in snapshot.functions.items():
        wanted, source = desired_driver(snapshot, desires, address)
        if not wanted or source in refused or function.physfn in recreating or satisfied(function, wanted):
            continue
        label = _label(function)
        if address in holds:
            refuse(address, Action.BIND, SKIPPED, _held(label, holds, address))
            continue
        if address in blocked:
            refuse(address, Action.BIND, SKIPPED, blocked[address])
            continue
        if address in leased:
            refuse(address, Action.BIND, "Busy", f"{label} is leased to VM {leased[address]}")
            continue
        problem = guard_problem(address, f"bind {label} to {wanted}")
        if problem:
            refuse(address, Action.BIND, "Protected", problem)
        elif function.num_vfs and wanted in PASSTHROUGH_DRIVERS:
            refuse(address, Action.BIND, "InvalidArgument",
                   f"{label} has {function.num_vfs} VFs; unbinding its PF driver would orphan them")
        else:
            plan.steps.append(Step(address, Action.BIND, f"{function.driver or 'no driver'} → {wanted}",
                                   driver=wanted, pf=function.physfn))
    return plan


def _plan_vf_settings(plan: Plan, snapshot: HostSnapshot, pf: str, desire: DeviceDesire, leased: dict[str, str],
                      holds: Container[str], blocked: dict[str, str], guard_problem) -> None:
    """A ``vf`` step per VF of ``pf`` whose settings differ from the persisted ones."""
    function = snapshot.functions.get(pf)
    if function is None or not function.interfaces:
        return
    pf_mac = desire.identity.permanent_mac or function.permanent_mac
    for index, wanted in sorted(desired_settings(desire, pf_mac, len(function.virtfns)).items()):
        if index >= len(function.virtfns):
            continue  # not created (yet): applied when the VF count is
        vf = function.virtfns[index]
        current = snapshot.vf_settings_of(vf)
        todo = {name: value for name, value in wanted.items()
                if current is not None and getattr(current, name) != value}
        if not todo:
            continue
        label = f"VF {index} ({vf}) of {_label(function)}"
        problem = guard_problem(vf, f"change the settings of {label}")
        if vf in holds:
            plan.refusals.append(not_applied(vf, Action.VF, SKIPPED, _held(label, holds, vf)))
        elif vf in blocked:
            plan.refusals.append(not_applied(vf, Action.VF, SKIPPED, blocked[vf]))
        elif vf in leased:
            plan.refusals.append(not_applied(vf, Action.VF, "Busy", f"{label} is leased to VM {leased[vf]}"))
        elif problem:
            plan.refusals.append(not_applied(vf, Action.VF, "Protected", problem))
        else:
            text = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in todo.items())
            plan.steps.append(Step(vf, Action.VF, f"VF {index}: {text}", count=index, pf=pf,
                                   settings=tuple(todo.items())))


def find_moves(snapshot: HostSnapshot, desires: dict[str, DeviceDesire]) -> tuple[dict[str, str], list[StepOutcome]]:
    """Persisted devices found at another address: {old address: new address}, and ambiguities.

    A PF or plain function moves when its serial number (same function number) or permanent MAC
    is seen at exactly one other address that no other desire claims. A VF desire moves to the
    address of ``virtfnN`` of its PF (its index is its identity)."""
    moves: dict[str, str] = {}
    findings: list[StepOutcome] = []
    identities = {}

    def identity(address: str):
        if address not in identities:
            identities[address] = identity_of(snapshot.functions[address], snapshot)
        return identities[address]

    def at_home(address: str) -> bool:
        return address in snapshot.functions and not desires[address].identity.mismatch(identity(address))

    for address, desire in desires.items():
        recorded = desire.identity
        if recorded.physfn or at_home(address) or not (recorded.serial or recorded.permanent_mac):
            continue
        candidates = [other for other, function in snapshot.functions.items()
                      if other != address and not function.physfn
                      and recorded.same_card(address, identity(other), other)
                      and not (other in desires and at_home(other))]
        if len(candidates) == 1:
            moves[address] = candidates[0]
        elif len(candidates) > 1:
            findings.append(not_applied(address, Action.FOLLOW, "IdentityChanged",
                                    f"the card persisted at {address} matches {', '.join(candidates)}; not followed"))
    targets = collections.Counter(moves.values())
    for old, new in list(moves.items()):
        clash = targets[new] > 1 or (new in desires and new not in moves)
        if clash:
            del moves[old]
            findings.append(not_applied(old, Action.FOLLOW, "IdentityChanged",
                                    f"the card persisted at {old} is now at {new}, which holds another persisted "
                                    "desire; not followed"))
    for address, desire in desires.items():
        recorded = desire.identity
        if not recorded.physfn or recorded.vf_index < 0:
            continue
        parent = snapshot.functions.get(moves.get(recorded.physfn, recorded.physfn))
        if parent is None or recorded.vf_index >= len(parent.virtfns):
            continue
        new = parent.virtfns[recorded.vf_index]
        if new != address and new not in desires:
            moves[address] = new
    return moves, findings
