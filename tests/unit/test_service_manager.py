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


def test_records_are_written_by_a_thread_of_their_own_in_order_and_flushed(monkeypatch):
    """A write to the journal (or stderr) can wait for a busy journald: never on the event loop."""
    import io
    import sys
    import threading

    from nicpassd import service_manager

    class Stderr(io.StringIO):
        writers: set[str] = set()

        def write(self, text: str) -> int:
            self.writers.add(threading.current_thread().name)
            return super().write(text)

        def isatty(self) -> bool:
            return False

    stderr = Stderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(service_manager, "JOURNAL_SOCKET", "/nonexistent/journal/socket")
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        service_manager.setup_logging("info")
        for n in range(50):
            logging.getLogger("nicpassd.test").info("line %d", n)
        service_manager.setup_logging("info")  # a second setup stops (and drains) the first writer
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.stop()
        root.setLevel(saved[0])
        for handler in saved[1]:
            root.addHandler(handler)
    lines = [line.rsplit(" ", 1)[-1] for line in stderr.getvalue().splitlines()]
    assert lines == [str(n) for n in range(50)]
    assert threading.current_thread().name not in Stderr.writers and Stderr.writers
