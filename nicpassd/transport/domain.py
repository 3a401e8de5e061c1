"""The PCI devices of a libvirt domain XML (``PrepareDomain``, called by the libvirt hook).

The same reading as the hook helper's (client/hooks/nicpassd_hook.py ``domain_devices``, which
cannot import the daemon; tests/unit/test_hook_domain.py checks that both agree): the domain's
``<name>`` and ``<uuid>``, and the source address of every ``<hostdev mode='subsystem'
type='pci'>`` (managed or not) and ``<interface type='hostdev'>`` under ``<devices>`` — nothing
in ``<metadata>`` or anywhere else. A DOCTYPE is refused (libvirt writes none, and without one
there are no entities to expand); pyexpat fetches nothing external.
"""

from __future__ import annotations

from xml.parsers import expat

from nicpassd.errors import InvalidArgument


def _number(text: str | None) -> int:
    text = (text or "0").strip().lower()
    return int(text, 16) if text.startswith("0x") else int(text, 10)


def _pci_address(attrs: dict[str, str]) -> str:
    return "%04x:%02x:%02x.%x" % (_number(attrs.get("domain")), _number(attrs.get("bus")),
                                  _number(attrs.get("slot")), _number(attrs.get("function")))


def domain_devices(xml: str | bytes) -> tuple[str, str, list[str]]:
    """(name, uuid, [PCI addresses]) of a libvirt domain XML; InvalidArgument when unreadable."""
    stack: list[str] = []
    attributes: list[dict[str, str]] = []
    texts: dict[str, list[str]] = {"name": [], "uuid": []}
    devices: list[str] = []
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def no_doctype(*_args: object) -> None:  # libvirt writes none; entities need one
        raise ValueError("a DOCTYPE is not accepted in a domain XML")

    parser.StartDoctypeDeclHandler = no_doctype

    def start(tag: str, attrs: dict[str, str]) -> None:
        stack.append(tag)
        attributes.append(attrs)
        if len(stack) == 5 and stack[1] == "devices" and stack[3] == "source" and tag == "address":
            parent, kind = stack[2], attributes[2]
            if (parent == "hostdev" and kind.get("mode", "subsystem") == "subsystem" and kind.get("type") == "pci") \
                    or (parent == "interface" and kind.get("type") == "hostdev"):
                if attrs.get("type", "pci") == "pci":
                    devices.append(_pci_address(attrs))

    def end(tag: str) -> None:
        stack.pop()
        attributes.pop()

    def text(data: str) -> None:
        if len(stack) == 2 and stack[1] in texts:
            texts[stack[1]].append(data)

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        parser.Parse(xml, True)
    except (expat.ExpatError, ValueError) as exc:  # ValueError: a bad number in an address
        raise InvalidArgument(f"its domain XML cannot be read ({exc})") from None
    unique = list(dict.fromkeys(devices))
    return "".join(texts["name"]).strip(), "".join(texts["uuid"]).strip(), unique
