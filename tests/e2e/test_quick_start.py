"""The README's libvirt quick start, run as written in the guest kernel (issue 20).

The commands and the domain XML are read from the README itself (the blocks after the
``quick-start:`` markers); only what differs between the README's example host and the guest is
replaced: the PF's name, the VFs' addresses, ``type='kvm'`` (the nested QEMU has no KVM) and the
memory, and ``virsh start`` starts the domain paused (no nested guest code has to run). Each
command must succeed (``check`` may also exit 8: it names what fails), and what the README says
each does must be what the kernel shows.
"""

from __future__ import annotations

import re
import shlex

import pytest

from .conftest import IGB, REPO
from .test_libvirt import VIRSH, pci_address
from .test_vf_settings import vf_lines

pytestmark = pytest.mark.e2e

README_PF, README_VF1 = "enp59s0f0", "0000:3b:02.1"
README_ADDRESS = "domain='0x0000' bus='0x3b' slot='0x02' function='0x{}'"


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- quick-start:{marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, f"README.md has no quick-start:{marker} block"
    return found.group(1)


def readme_commands() -> list[list[str]]:
    commands = []
    for line in readme_block("shell").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def test_the_readme_quick_start_works_as_written(g):
    commands = readme_commands()
    assert [c[:2] for c in commands] == [
        ["nicpassctl", "check"], ["nicpassctl", "guard"], ["nicpassctl", "vfs"], ["nicpassctl", "vf"],
        ["nicpassctl", "reconcile"], ["ip", "link"], ["virsh", "define"], ["virsh", "start"], ["nicpassctl", "leases"],
        ["virsh", "destroy"], ["nicpassctl", "show"]], "the README's quick start changed: update this test with it"
    pf = g.fn(IGB)
    interface = pf["net"][0]
    domain = readme_block("domain")
    name = re.search(r"<name>(.*)</name>", domain).group(1)

    def guest(word: str, vfs: list[str]) -> str:
        word = word.replace(README_PF, interface)
        return vfs[1] if word == README_VF1 else word

    vfs: list[str] = []
    try:
        for command in commands:
            if command[:2] == ["virsh", "define"]:
                xml = domain.replace("type='kvm'", "type='qemu'").replace("<memory unit='MiB'>1024", "<memory unit='MiB'>64")
                for index, vf in enumerate(vfs):
                    xml = xml.replace(README_ADDRESS.format(index), pci_address(vf))
                assert pci_address(vfs[0]) in xml and pci_address(vfs[1]) in xml, xml
                g.vm.write_file(f"/tmp/{command[2]}", xml)
                command = [*command[:2], f"/tmp/{command[2]}"]
            if command[:2] == ["virsh", "start"]:
                command = [*command, "--paused"]
            argv = [*VIRSH, *command[1:]] if command[0] == "virsh" else [guest(word, vfs) for word in command]
            result = g.run(argv, timeout=300)
            allowed = (0, 8) if command[:2] == ["nicpassctl", "check"] else (0,)
            assert result.returncode in allowed, f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}\n" \
                                                 f"{result.stderr}\n{g.journal(30)}"
            what = command[:2]
            if what == ["nicpassctl", "guard"]:
                assert "0000:01:00.0" in result.stdout, result.stdout  # the management NIC, with its chain
            elif what == ["nicpassctl", "vfs"]:
                vfs = g.fn(IGB)["virtfns"]
                assert len(vfs) == 2
            elif what == ["nicpassctl", "vf"]:
                assert vf_lines(g, interface)[1]["trust"] is True
                before = vf_lines(g, interface)[1]
            elif what == ["nicpassctl", "reconcile"]:
                assert result.stdout.startswith("Nothing to do"), result.stdout
            elif what == ["virsh", "start"]:
                assert (g.fn(vfs[0])["driver"], g.fn(vfs[1])["driver"]) == ("vfio-pci", "vfio-pci")
                running = vf_lines(g, interface)[1]
                assert running["address"] == "52:54:00:6d:90:02" and running["vlan_list"][0]["vlan"] == 42, running
            elif what == ["nicpassctl", "leases"]:
                assert name in result.stdout and vfs[0] in result.stdout and vfs[1] in result.stdout, result.stdout
            elif what == ["virsh", "destroy"]:
                g.wait(lambda _s: name not in g.ctl("leases").stdout, 30, what="the lease released")
            elif what == ["nicpassctl", "show"]:
                after = vf_lines(g, interface)[1]
                kept = ("address", "vlan_list", "trust", "spoofchk")
                assert {k: after.get(k) for k in kept} == {k: before.get(k) for k in kept}, (before, after)
                assert "trust on" in result.stdout, result.stdout  # its VF settings line, as `ip link` has it
    finally:
        g.run([*VIRSH, "destroy", name], timeout=120)
        g.run([*VIRSH, "undefine", name])
        g.run(["ip", "link", "set", interface, "down"])
        g.ctl("vfs", IGB, "0")
        g.ctl("forget", IGB)
