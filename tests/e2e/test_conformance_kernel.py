"""The conformance checks of conformance.py on the guest's real kernel, compared with the simulator.

Two simulators are compared with the kernel: one built from ``guest-topology.toml`` (what the unit
suite's ``test_conformance_sim.py`` runs) and one from the topology that ``nicpassd
--record-topology`` records in the guest. Every difference in observed behaviour fails, is listed
in the failure message and written to the run folder (conformance-differences-<label>.txt).

The live kernel's observations are saved in the run folder as kernel-observations.json, and must
equal the committed kernel-observations/ file that the unit suite holds the simulator to.
"""

from __future__ import annotations

import json

import pytest

from nicpassd.sim.topology import load_topology

from . import conformance
from .conftest import CACHE, GUEST_E2E, REPO, SESSION_NOTES
from .simkernel import GUEST_TOPOLOGY, KERNEL_OBSERVATIONS, load_kernel_observations, sim_run

pytestmark = pytest.mark.e2e

SAVED = CACHE / "run" / "kernel-observations.json"


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
    release = g.run(["uname", "-r"]).stdout.strip()
    saved = {"source": f"recorded live by tests/e2e/test_conformance_kernel.py: `python3 conformance.py --json` "
                       f"in the e2e guest (Linux {release}, igb PF with igbvf VFs, e1000e)", **data}
    SAVED.parent.mkdir(parents=True, exist_ok=True)
    SAVED.write_text(json.dumps(saved, indent=1) + "\n")
    SESSION_NOTES.append(f"kernel observations (Linux {release}) saved in {SAVED}")
    return data, recorded


@pytest.mark.parametrize("name", [fn.__name__ for fn in conformance.CHECKS])
def test_kernel_obeys_the_rules(kernel_run, name):
    data, _ = kernel_run
    result = data["results"][name]
    assert result["ok"], result["error"]


def test_committed_kernel_observations_are_the_live_kernels(kernel_run):
    """The file the unit suite holds the simulator to must say what this kernel says."""
    data, _ = kernel_run
    diffs = conformance.run_differences(data, load_kernel_observations(), "kernel", "committed")
    if diffs:
        pytest.fail(f"{KERNEL_OBSERVATIONS.relative_to(REPO)} differs from the live kernel in {len(diffs)} "
                    f"observations:\n  " + "\n  ".join(diffs) + f"\nRefresh it from this run's recording "
                    f"(cp {SAVED} {KERNEL_OBSERVATIONS.relative_to(REPO)}), then make the simulator agree "
                    f"(tests/e2e/test_conformance_sim.py).")


def _compare(kernel_data: dict, topology, label: str, tmp_path_factory) -> list[str]:
    env = conformance.Env(**kernel_data["env"])
    sim_data = sim_run(topology, env, tmp_path_factory.mktemp("sim"))
    return conformance.run_differences(kernel_data, sim_data, "kernel", label)


def _check(diffs: list[str], label: str) -> None:
    path = CACHE / "run" / f"conformance-differences-{label}.txt"
    path.write_text("".join(d + "\n" for d in diffs))
    SESSION_NOTES.append(f"kernel vs simulator ({label}): {len(diffs)} differences (list in {path})")
    if diffs:
        pytest.fail(f"the simulator ({label}) differs from the guest kernel in {len(diffs)} observations:\n  "
                    + "\n  ".join(diffs))


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
