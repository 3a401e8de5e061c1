"""Kernel-behaviour conformance of the simulated kernel (part of the normal unit suite).

The checks in conformance.py run here against SimKernel with the e2e guest's topology, and in
the e2e suite against the guest's real kernel (test_conformance_kernel.py), where the two sets of
observations are also compared.
"""

from __future__ import annotations

import shutil

import pytest

from nicpassd.sim.topology import load_topology

from . import conformance
from .simkernel import GUEST_TOPOLOGY, SimUnderTest, guest_env


@pytest.fixture
def sim(tmp_path):
    return SimUnderTest(load_topology(str(GUEST_TOPOLOGY)), tmp_path)


@pytest.mark.parametrize("name", [fn.__name__ for fn in conformance.CHECKS])
def test_sim_conforms(sim, name):
    result = conformance.run_all(sim, guest_env(), [name])[name]
    assert result["ok"], result["error"]
