"""The conformance checks of conformance.py on the guest's real kernel, compared with the simulator.

Two simulators are compared with the kernel: one built from ``guest-topology.toml`` (what the unit
suite's ``test_conformance_sim.py`` runs) and one from the topology that ``nicpassd
--record-topology`` records in the guest. Every difference in observed behaviour is listed in
the failure message and written to the run folder (conformance-differences.txt).
"""

from __future__ import annotations

import json

import pytest

from nicpassd.sim.topology import load_topology

from . import conformance
from .conftest import CACHE, GUEST_E2E, SESSION_NOTES
from .simkernel import GUEST_TOPOLOGY, SimUnderTest, guest_env

pytestmark = pytest.mark.e2e

# Differences already reported to the simulator's owner: (check, observation) -> issue note.
# A difference listed here makes the comparison xfail instead of fail; one that disappears makes
# it XPASS, which says the list can shrink.
SIM_UEVENTS = ("simulator uevents differ from the kernel's (reported to the lead): VF 'change' after 'add', "
               "netdev 'add' before 'bind', no DRIVER on 'unbind', VFs removed in ascending order, no PF 'change' "
               "on disable, DRIVER on the PF 'change'")
KNOWN = {
    ("uevents_vf_creation", "create 2 VFs"): SIM_UEVENTS,
    ("uevents_vf_creation", "remove 2 VFs"): SIM_UEVENTS,
    ("uevents_bind", "VF to vfio-pci"): SIM_UEVENTS,
    ("uevents_bind", "VF back to host driver"): SIM_UEVENTS,
}


@pytest.fixture(scope="module")
def kernel_run(guest):
    from .conftest import G
    g = G(guest)
    g.reset()
    g.run("systemctl stop nicpassd").check()  # nothing may react to the checks' changes
    try:
        result = g.run(["python3", f"{GUEST_E2E}/conformance.py", "--json"], timeout=600)
        data = json.loads(result.stdout)
        recorded = g.run(["nicpassd", "--record-topology", "-"])
    finally:
        g.run("systemctl start nicpassd")
    return data, recorded


@pytest.mark.parametrize("name", [fn.__name__ for fn in conformance.CHECKS])
def test_kernel_obeys_the_rules(kernel_run, name):
    data, _ = kernel_run
    result = data["results"][name]
    assert result["ok"], result["error"]


def _compare(kernel_results: dict, topology, label: str, tmp_path_factory) -> list[str]:
    sim = SimUnderTest(topology, tmp_path_factory.mktemp("sim"))
    env = conformance.Env(**json.loads(json.dumps(kernel_run_env(kernel_results))))
    sim_results = conformance.run_all(sim, env)
    return conformance.differences(kernel_results["results"], sim_results, "kernel", label)


def kernel_run_env(data: dict) -> dict:
    return data["env"]


def _report(diffs: list[str], label: str) -> None:
    path = CACHE / "run" / f"conformance-differences-{label}.txt"
    path.write_text("\n".join(diffs) + "\n")
    SESSION_NOTES.append(f"kernel vs simulator ({label}): {len(diffs)} differences (list in {path})")


def _check(diffs: list[str], label: str) -> None:
    _report(diffs, label)
    unknown = [d for d in diffs if d.split(": ", 2)[:2] and tuple(d.split(": ", 2)[:2]) not in KNOWN]
    if unknown:
        pytest.fail(f"the simulator ({label}) differs from the guest kernel in {len(unknown)} observations:\n  "
                    + "\n  ".join(unknown))
    if diffs:
        pytest.xfail(f"{len(diffs)} known differences: " + "; ".join(sorted(set(KNOWN.values()))))


def test_simulator_agrees_with_kernel(kernel_run, tmp_path_factory):
    data, _ = kernel_run
    diffs = _compare(data, load_topology(str(GUEST_TOPOLOGY)), "guest-topology.toml", tmp_path_factory)
    _check(diffs, "guest-topology")


def test_recorded_topology_simulator_agrees_with_kernel(kernel_run, tmp_path_factory):
    data, recorded = kernel_run
    assert recorded.returncode == 0, f"nicpassd --record-topology failed: {recorded.stderr}"
    path = tmp_path_factory.mktemp("rec") / "recorded.json"
    path.write_text(recorded.stdout)
    try:
        topology = load_topology(str(path))
    except Exception:
        path = path.with_suffix(".toml")
        path.write_text(recorded.stdout)
        topology = load_topology(str(path))
    (CACHE / "run" / "recorded-guest-topology.txt").write_text(recorded.stdout)
    diffs = _compare(data, topology, "recorded", tmp_path_factory)
    _check(diffs, "recorded")
