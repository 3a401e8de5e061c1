"""`nicpassctl reconcile`: parsing, rendering, exit codes (the daemon side: test_reconcile.py and
tests/integration/test_persistence.py)."""

from __future__ import annotations

from nicpassctl import cli, render
from nicpassctl.commands import COMMANDS, action_for

ROWS = [
    ["0000:3b:00.0", "vfs", "ok"],
    ["0000:3b:02.0", "bind", "ok"],
    ["0000:5e:00.0", "check", "IdentityChanged: 0000:5e:00.0 is not the device that was persisted"],
    ["0000:af:00.0", "check", "skipped: 0000:af:00.0 was changed with --runtime; left as it is"],
]


def test_the_command_exists_and_asks_for_the_manage_action():
    args = cli.build_parser().parse_args(["reconcile"])
    assert args.command == "reconcile" and "reconcile" in COMMANDS
    action = action_for(args)
    assert action.polkit == "org.nicpass.NicPass1.manage"


def test_text_lists_every_row_and_counts():
    text = render.reconcile_text(ROWS)
    lines = text.splitlines()
    assert lines[0].split() == ["ADDRESS", "ACTION", "RESULT"]
    assert any(line.startswith("0000:5e:00.0  check   IdentityChanged:") for line in lines)
    assert lines[-1] == ("2 step(s) applied, 1 not applied, 1 left alone on purpose (a --runtime change stays "
                         "until the device is re-plugged or the host reboots; repeat that change without --runtime "
                         "to persist it)")
    # Issue 20: the count and the exit status agree (exit 1 exactly when something is "not applied").
    assert render.reconcile_text([ROWS[0], ROWS[3]]).splitlines()[-1].startswith("1 step(s) applied, 0 not applied")
    assert render.reconcile_failed([ROWS[0], ROWS[3]]) is False
    assert render.reconcile_text([]) == "Nothing to do: every device is in its persisted state."


def test_json_and_exit_status():
    assert render.reconcile_json(ROWS[:1]) == [{"address": "0000:3b:00.0", "action": "vfs", "result": "ok"}]
    assert render.reconcile_failed(ROWS) is True  # IdentityChanged: not applied
    assert render.reconcile_failed([ROWS[0], ROWS[3]]) is False  # a --runtime device left alone is fine
    assert render.reconcile_failed([]) is False


def test_plan_is_a_read_that_counts_what_it_would_do():
    """Issue 20: `reconcile --plan` asks for no authorization, writes nothing, and exits 1 exactly
    when a desire would not be applied."""
    args = cli.build_parser().parse_args(["reconcile", "--plan"])
    assert args.plan is True
    planned = [["0000:3b:00.0", "vfs", "planned: 0 → 4 VFs on vfio-pci"], ROWS[3]]
    text = render.reconcile_text(planned, planned=True)
    assert text.splitlines()[-1].startswith("1 step(s) planned, 0 would not be applied, 1 left alone on purpose")
    assert "nothing was changed" in text.splitlines()[-1]
    assert render.reconcile_failed(planned) is False
    assert render.reconcile_failed([*planned, ROWS[2]]) is True
