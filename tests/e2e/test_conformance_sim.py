"""Kernel-behaviour conformance of the simulated kernel (part of the normal unit suite).

The checks in conformance.py run here against SimKernel with the e2e guest's topology, and in
the e2e suite against the guest's real kernel (test_conformance_kernel.py), where the two sets of
observations are also compared. What that real kernel observed is committed in
kernel-observations/ (the e2e suite checks that it still matches the live kernel), and every
observation of the simulator must equal it here, on every unit run.
"""

from __future__ import annotations

import pytest

from nicpassd.sim.topology import load_topology

from . import conformance
from .simkernel import GUEST_TOPOLOGY, KERNEL_OBSERVATIONS, SimUnderTest, guest_env, load_kernel_observations, sim_run


@pytest.fixture
def sim(tmp_path):
    return SimUnderTest(load_topology(str(GUEST_TOPOLOGY)), tmp_path)


@pytest.mark.parametrize("name", [fn.__name__ for fn in conformance.CHECKS])
def test_sim_conforms(sim, name):
    result = conformance.run_all(sim, guest_env(), [name])[name]
    assert result["ok"], result["error"]


def test_kernel_observations_cover_every_check():
    kernel = load_kernel_observations()
    assert kernel.get("source"), f"{KERNEL_OBSERVATIONS} must say where its observations came from"
    assert sorted(kernel["results"]) == sorted(fn.__name__ for fn in conformance.CHECKS), (
        f"{KERNEL_OBSERVATIONS} has other checks than conformance.py: record it again on the real kernel")
    assert kernel["env"] == guest_env().to_dict()


def test_sim_observes_what_the_real_kernel_observed(tmp_path):
    kernel = load_kernel_observations()
    ran = sim_run(load_topology(str(GUEST_TOPOLOGY)), conformance.Env(**kernel["env"]), tmp_path)
    diffs = conformance.run_differences(kernel, ran, "kernel", "sim")
    assert not diffs, (f"the simulator (guest-topology.toml) differs from the real kernel's observations in "
                       f"{KERNEL_OBSERVATIONS.name} in {len(diffs)} places:\n  " + "\n  ".join(diffs))
