"""The PCI devices of a libvirt domain XML, as the daemon (PrepareDomain, nicpassd/transport/domain.py)
and the hook helper (client/hooks/nicpassd_hook.py, which cannot import the daemon's package) read
them: both through the one module client/hooks/nicpassd_domain_xml.py (the daemon from its
site-packages, the helper from its own directory)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support import REPO

from nicpassd.errors import InvalidArgument
from nicpassd.transport.domain import domain_devices

sys.path.insert(0, str(REPO / "client" / "hooks"))
import nicpassd_domain_xml as helper_reading  # noqa: E402  (what the helper imports)
import nicpassd_hook as hook  # noqa: E402, F401  (its directory is the helper's sys.path[0])

UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"


def domain(devices: str, *, head: str = f"<name>web</name><uuid>{UUID}</uuid>") -> str:
    return f"<domain type='kvm'>{head}<metadata><x:hostdev xmlns:x='urn:x' mode='subsystem' type='pci'>" \
           f"<source><address domain='0' bus='0x99' slot='0' function='0'/></source></x:hostdev></metadata>" \
           f"<devices><emulator>/usr/bin/qemu</emulator>{devices}</devices></domain>"


def hostdev(attrs: str, address: str) -> str:
    return f"<hostdev {attrs}><driver name='vfio'/><source>{address}</source><alias name='hostdev0'/>" \
           "<address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/></hostdev>"


CASES = {
    "managed and not": domain(
        hostdev("mode='subsystem' type='pci' managed='yes'",
                "<address domain='0x0000' bus='0x3b' slot='0x02' function='0x0'/>")
        + hostdev("mode='subsystem' type='pci' managed='no'",
                  "<address domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/>")),
    "interface hostdev": domain(
        "<interface type='hostdev' managed='yes'><mac address='52:54:00:a1:b2:c3'/><source>"
        "<address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x2'/></source></interface>"),
    "double quotes, decimal, default mode": domain(
        hostdev('type="pci"', '<address domain="0" bus="59" slot="2" function="3"/>')),
    "duplicates once": domain(
        hostdev("mode='subsystem' type='pci'", "<address domain='0x0000' bus='0x3b' slot='0x02' function='0x0'/>") * 2),
    "not PCI: usb, scsi, capabilities, a network interface": domain(
        "<hostdev mode='subsystem' type='usb'><source><vendor id='0x046d'/><address bus='1' device='3'/></source>"
        "</hostdev><hostdev mode='capabilities' type='net'><source><interface>eth9</interface></source></hostdev>"
        "<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/>"
        "<address bus='0' target='0' unit='0'/></source></hostdev>"
        "<interface type='network'><source network='default'/>"
        "<address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></interface>"),
    "comments and CDATA": domain(
        "<!-- <hostdev mode='subsystem' type='pci'><source><address bus='0x11' slot='0'/></source></hostdev> -->"
        + hostdev("mode='subsystem' type='pci'", "<address domain='0x0000' bus='0xaf' slot='0x00' function='0x1'/>")
        + "<description><![CDATA[<hostdev type='pci'/>]]></description>"),
    "no uuid": domain(hostdev("type='pci'", "<address bus='0x3b' slot='0x02' function='0x4'/>"), head="<name>x</name>"),
    "no device at all": domain(""),
}
BROKEN = {
    "not XML": "<domain><devices><hostdev/>",
    "a bad number": domain(hostdev("type='pci'", "<address bus='0xzz' slot='0' function='0'/>")),
}


def test_the_helper_reads_with_the_daemons_own_code():
    """One module, no link: the daemon imports the very file that sits beside the helper."""
    beside_the_helper = REPO / "client" / "hooks" / "nicpassd_domain_xml.py"
    assert not beside_the_helper.is_symlink() and beside_the_helper.is_file()
    assert Path(helper_reading.__file__).resolve() == beside_the_helper.resolve()
    assert Path(sys.modules[domain_devices.__module__].domain_xml.__file__).resolve() == beside_the_helper.resolve()
    assert not (REPO / "nicpassd" / "domain_xml.py").exists()


@pytest.mark.parametrize("xml", CASES.values(), ids=CASES.keys())
def test_the_daemon_and_the_helper_read_a_domain_alike(xml):
    assert domain_devices(xml) == helper_reading.domain_devices(xml.encode())


def test_what_is_read():
    assert domain_devices(CASES["managed and not"]) == ("web", UUID, ["0000:3b:02.0", "0000:3b:02.1"])
    assert domain_devices(CASES["double quotes, decimal, default mode"])[2] == ["0000:3b:02.3"]
    assert domain_devices(CASES["duplicates once"])[2] == ["0000:3b:02.0"]
    assert domain_devices(CASES["not PCI: usb, scsi, capabilities, a network interface"])[2] == []
    assert domain_devices(CASES["comments and CDATA"])[2] == ["0000:af:00.1"]
    assert domain_devices(CASES["no uuid"]) == ("x", "", ["0000:3b:02.4"])


@pytest.mark.parametrize("xml", BROKEN.values(), ids=BROKEN.keys())
def test_an_unreadable_domain_is_refused_by_both(xml):
    with pytest.raises(InvalidArgument, match="its domain XML cannot be read"):
        domain_devices(xml)
    with pytest.raises(ValueError):  # the helper reports it: "its domain XML cannot be read (...)"
        helper_reading.domain_devices(xml.encode())


def test_a_doctype_is_refused_so_no_entity_is_ever_expanded():
    entities = "".join(f"<!ENTITY {chr(98 + i)} '{('&' + chr(97 + i) + ';') * 10}'>" for i in range(9))
    bomb = f"<!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'>{entities}]><domain><name>&j;</name></domain>"
    with pytest.raises(InvalidArgument, match="a DOCTYPE is not accepted"):
        domain_devices(bomb)
    with pytest.raises(ValueError, match="a DOCTYPE is not accepted"):
        helper_reading.domain_devices(bomb.encode())
    assert domain_devices("<domain><name>a &lt; b</name></domain>")[0] == "a < b"  # the predefined ones
