"""``PrepareDomain``'s reading of a libvirt domain XML (``nicpassd_domain_xml``, the module the
libvirt hook's helper reads domains with too), with its errors as the API's InvalidArgument."""

from __future__ import annotations

import nicpassd_domain_xml as domain_xml
from nicpassd.errors import InvalidArgument


def domain_devices(xml: str | bytes) -> tuple[str, str, list[str]]:
    """(name, uuid, [PCI addresses]) of a libvirt domain XML; InvalidArgument when unreadable."""
    try:
        return domain_xml.domain_devices(xml)
    except ValueError as exc:  # also a bad number in an address
        raise InvalidArgument(f"its domain XML cannot be read ({exc})") from None
