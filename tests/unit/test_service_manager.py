"""Journal fields: log calls with extra={"device": …} become NICPASSD_DEVICE=… journal fields."""

import logging

from nicpassd.service_manager import _StructuredFields


def test_extra_device_becomes_an_uppercase_journal_field():
    record = logging.LogRecord("nicpassd", logging.INFO, __file__, 1, "bound %s", ("x",), None)
    record.device = "0000:3b:02.0"
    record.action = "bind"
    assert _StructuredFields().filter(record)
    assert (record.NICPASSD_DEVICE, record.NICPASSD_ACTION) == ("0000:3b:02.0", "bind")
    assert not hasattr(record, "NICPASSD_VM_UUID")
