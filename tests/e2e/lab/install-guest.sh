#!/bin/bash
# Install nicpassd in the e2e guest the way an administrator would: packaging/install from the
# checkout (shared read-only at /mnt/src), offline with the wheels the host built
# (/mnt/e2e/wheels: nicpassd's own wheel and its dependencies, which the image already has in its
# system Python and the installer's venv sees). It installs the venv, the /usr/bin links, the
# unit, the bus policy, the polkit actions, the example config, the udev rule and helper, the
# libvirt hook and helper and the Proxmox hookscript, then enables and starts the service.
# Prints one "installed: ..." line per file so the suite's log shows what was tested.
set -euo pipefail
SRC=${1:-/mnt/src}
WHEELS=${2:-/mnt/e2e/wheels}
bash "$SRC/packaging/install" --wheels "$WHEELS" --start
systemctl is-active nicpassd.service
