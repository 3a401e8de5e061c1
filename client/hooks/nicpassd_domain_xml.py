"""The PCI devices of a libvirt domain XML: one reading for the daemon and the hook helper.

nicpassd's ``PrepareDomain`` (nicpassd/transport/domain.py) and the libvirt hook's helper, when
the daemon cannot be asked (client/hooks/nicpassd_hook.py), must read a domain the same way, so
both import this one module: it is a top-level module of the nicpassd distribution (pyproject's
``py-modules``, installed in the daemon's site-packages) and it sits beside the helper, which
imports modules from its own directory (in this tree, and where packaging/install puts it): its ``<name>`` and ``<uuid>``, and the source address of every ``<hostdev
mode='subsystem' type='pci'>`` (managed or not) and ``<interface type='hostdev'>`` under
``<devices>`` — nothing in ``<metadata>`` or anywhere else. A DOCTYPE is refused (libvirt writes
none, and without one there are no entities to expand); pyexpat fetches nothing external.

Standard library only, and only pyexpat of it (``xml.parsers.expat`` wraps it): the helper runs
on every start of a VM with PCI devices and imports nothing that costs.
"""

import pyexpat


def _number(text):
    text = (text or "0").strip().lower()
    return int(text, 16) if text.startswith("0x") else int(text, 10)


def _pci_address(attrs):
    return "%04x:%02x:%02x.%x" % (_number(attrs.get("domain")), _number(attrs.get("bus")),
                                  _number(attrs.get("slot")), _number(attrs.get("function")))


def domain_devices(xml):
    """(name, uuid, [PCI addresses, each once]) of a libvirt domain XML (str or bytes);
    ValueError when it cannot be read."""
    stack, attributes, texts, devices = [], [], {"name": [], "uuid": []}, []
    parser = pyexpat.ParserCreate()
    parser.SetParamEntityParsing(pyexpat.XML_PARAM_ENTITY_PARSING_NEVER)

    def no_doctype(*_args):  # libvirt writes none; entities need one
        raise ValueError("a DOCTYPE is not accepted in a domain XML")

    def start(tag, attrs):
        stack.append(tag)
        attributes.append(attrs)
        if len(stack) == 5 and stack[1] == "devices" and stack[3] == "source" and tag == "address":
            parent, kind = stack[2], attributes[2]
            if (parent == "hostdev" and kind.get("mode", "subsystem") == "subsystem" and kind.get("type") == "pci") \
                    or (parent == "interface" and kind.get("type") == "hostdev"):
                if attrs.get("type", "pci") == "pci":
                    devices.append(_pci_address(attrs))

    def end(_tag):
        stack.pop()
        attributes.pop()

    def text(data):
        if len(stack) == 2 and stack[1] in texts:
            texts[stack[1]].append(data)

    parser.StartDoctypeDeclHandler = no_doctype
    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        parser.Parse(xml, True)
    except pyexpat.ExpatError as exc:
        raise ValueError(str(exc)) from None
    return "".join(texts["name"]).strip(), "".join(texts["uuid"]).strip(), list(dict.fromkeys(devices))
