"""An unprivileged user is denied by the real polkitd (exit 5); reading stays open to everyone."""

from __future__ import annotations

import pytest

from .conftest import E1000E, IGB

pytestmark = pytest.mark.e2e

USER = "e2euser"  # made by tests/e2e/lab/build: an ordinary account, no admin group


def test_unprivileged_user_is_denied_by_polkitd(g):
    assert g.run(["id", "-u", USER]).check().stdout.strip() != "0"
    result = g.ctl("--no-ask-password", "vfs", IGB, "2", user=USER)
    assert result.returncode == 5, (result.returncode, result.stdout, result.stderr)
    result = g.ctl("--no-ask-password", "bind", E1000E, "--driver", "vfio-pci", user=USER)
    assert result.returncode == 5, (result.returncode, result.stdout, result.stderr)
    fns = g.state()["functions"]
    assert fns[IGB]["sriov_numvfs"] == 0 and fns[E1000E]["driver"] == "e1000e", fns
    # it was the real polkitd that answered
    assert g.run(["systemctl", "is-active", "polkit"]).stdout.strip() == "active"


def test_unprivileged_user_may_read(g):
    result = g.ctl("--json", "list", user=USER)
    assert result.returncode == 0, result.stderr
    result = g.ctl("show", IGB, user=USER)
    assert result.returncode == 0, result.stderr


def test_root_is_authorized_by_polkitd(g):
    result = g.ctl("vfs", IGB, "1", "--runtime")
    assert result.returncode == 0, result.stderr
    assert g.fn(IGB)["sriov_numvfs"] == 1
