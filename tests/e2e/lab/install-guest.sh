#!/bin/bash
# Install nicpassd in the e2e guest the way an administrator would, from the checkout's own files
# (shared read-only at /mnt/src) and the wheels the host built (/mnt/e2e/wheels, no index):
#   the Python package (scripts linked into /usr/bin: the unit runs /usr/bin/nicpassd), the unit,
#   the D-Bus bus policy, the polkit actions, the example config, and the udev rule, the libvirt
#   hook and their helpers when the repo has them. Then start the service.
# Prints one "installed: ..." line per file so the suite's log shows what was tested.
set -euo pipefail
SRC=${1:-/mnt/src}
WHEELS=${2:-/mnt/e2e/wheels}

# The README's `pip install .`, offline. On Debian that is pip of the system Python with
# --break-system-packages (PEP 668), which puts the scripts in /usr/local/bin; the unit runs
# /usr/bin/nicpassd, so link them there (README: "installed as /usr/bin/nicpassd").
# The dependencies are in the image already; python3-systemd provides systemd-python.
pip=(pip install -q --no-index --find-links "$WHEELS" --disable-pip-version-check --break-system-packages)
"${pip[@]}" --force-reinstall --no-deps nicpassd
if ! python3 -c 'import nicpassd.daemon, nicpassd.transport.service' 2>/dev/null; then
  "${pip[@]}" nicpassd   # dependencies missing from the image (an older build): install them too
fi
for tool in nicpassd nicpassctl; do
  [ -e /usr/bin/$tool ] || ln -s /usr/local/bin/$tool /usr/bin/$tool
done
echo "installed: nicpassd $(python3 -c 'import importlib.metadata as m; print(m.version("nicpassd"))') in $(python3 -c 'import nicpassd, os; print(os.path.dirname(nicpassd.__file__))')"

put() {  # put SRC DEST MODE
  install -D -m "$3" "$1" "$2"
  echo "installed: $2 (from ${1#$SRC/})"
}
put "$SRC/systemd/nicpassd.service" /etc/systemd/system/nicpassd.service 0644
for f in "$SRC"/systemd/*; do   # any further units the repo ships (sockets, path units, drop-ins)
  case $f in */nicpassd.service) ;; *.service|*.socket|*.path|*.timer) put "$f" "/etc/systemd/system/$(basename "$f")" 0644 ;; esac
done
put "$SRC/dbus/org.nicpass.NicPass1.conf" /usr/share/dbus-1/system.d/org.nicpass.NicPass1.conf 0644
for f in "$SRC"/packaging/polkit/*.policy; do put "$f" "/usr/share/polkit-1/actions/$(basename "$f")" 0644; done
for f in "$SRC"/packaging/polkit/*.rules; do
  if [ -e "$f" ]; then put "$f" "/usr/share/polkit-1/rules.d/$(basename "$f")" 0644; fi
done
[ -e /etc/nicpassd/nicpassd.toml ] || put "$SRC/packaging/nicpassd.toml" /etc/nicpassd/nicpassd.toml 0644
# udev rules and their helper, where their headers say they go
for f in "$SRC"/packaging/udev/*.rules; do
  if [ -e "$f" ]; then put "$f" "/usr/lib/udev/rules.d/$(basename "$f")" 0644; fi
done
if [ -e "$SRC/packaging/udev/nicpassd-udev-override" ]; then
  put "$SRC/packaging/udev/nicpassd-udev-override" /usr/libexec/nicpassd/nicpassd-udev-override 0755
fi
if [ -e "$SRC/client/hooks/libvirt-qemu" ]; then
  put "$SRC/client/hooks/libvirt-qemu" /etc/libvirt/hooks/qemu.d/50-nicpassd 0755
  # its helper, where client/hooks/README.md says: /usr/lib/nicpassd/, byte-compiled
  for f in "$SRC/client/hooks/nicpassd-hook-helper" "$SRC"/client/hooks/*.py; do
    if [ -e "$f" ]; then put "$f" "/usr/lib/nicpassd/$(basename "$f")" 0755; fi
  done
  python3 -m compileall -q /usr/lib/nicpassd
  # libvirtd looks for hooks when it starts
  systemctl try-restart libvirtd.service
fi

systemctl daemon-reload
systemctl reload dbus
udevadm control --reload 2>/dev/null || true
systemctl enable nicpassd.service >/dev/null 2>&1 || true
systemctl start nicpassd.service
systemctl is-active nicpassd.service
