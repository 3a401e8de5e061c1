"""python-dbusmock template: a polkit Authority that decides by the subject's uid.

dbusmock's stock polkitd template decides by action id alone, which cannot tell root from nobody.
This one resolves the subject to a uid the way polkitd does (a bus name through the bus driver's
GetConnectionUnixUser, a process through its uid or /proc) and authorizes exactly the uids in
`allowed_uids` (parameter, default [0]), or, for an action given its own list with SetActionUids,
exactly the uids of that list -- the way a polkit rules file grants one action and not another
(`lease` to a libvirt group, `force` to no one). Every decision is recorded; read them with GetChecks on
TEST_IFACE.

Run with Debian's dbusmock (its dbus-python binding):
    /usr/bin/python3 -m dbusmock --system -t tests/support/polkit_uid.py -p '{"allowed_uids": [0]}'
"""

import dbus
import dbus.service

BUS_NAME = "org.freedesktop.PolicyKit1"
MAIN_OBJ = "/org/freedesktop/PolicyKit1/Authority"
MAIN_IFACE = "org.freedesktop.PolicyKit1.Authority"
SYSTEM_BUS = True

TEST_IFACE = "org.nicpass.Test.PolkitMock"
FAILED = "org.freedesktop.PolicyKit1.Error.Failed"


def load(mock, parameters):
    mock.AddProperties(MAIN_IFACE, dbus.Dictionary({
        "BackendName": "nicpass-test-uid",
        "BackendVersion": "0",
        "BackendFeatures": dbus.UInt32(0),
    }, signature="sv"))
    mock.allowed_uids = {int(uid) for uid in parameters.get("allowed_uids", [0])}
    mock.action_uids = {}
    mock.checks = []


def _proc_uid(pid):
    with open(f"/proc/{int(pid)}/status") as status:
        for line in status:
            if line.startswith("Uid:"):
                return int(line.split()[1])  # real uid, as polkit uses
    raise dbus.exceptions.DBusException(f"no uid for pid {pid}", name=FAILED)


def _subject_uid(mock, kind, details):
    if kind == "system-bus-name":
        try:
            return int(mock.connection.get_unix_user(str(details["name"])))
        except dbus.exceptions.DBusException as e:
            raise dbus.exceptions.DBusException(
                f"cannot resolve bus name {details.get('name')!r}: {e}", name=FAILED) from e
    if kind == "unix-process":
        if "uid" in details and int(details["uid"]) >= 0:
            return int(details["uid"])
        return _proc_uid(details["pid"])
    raise dbus.exceptions.DBusException(f"unsupported subject kind {kind!r}", name=FAILED)


@dbus.service.method(MAIN_IFACE, in_signature="(sa{sv})sa{ss}us", out_signature="(bba{ss})")
def CheckAuthorization(self, subject, action_id, _details, flags, _cancellation_id):
    kind, subject_details = subject
    uid = _subject_uid(self, str(kind), subject_details)
    authorized = uid in self.action_uids.get(str(action_id), self.allowed_uids)
    self.checks.append((str(action_id), dbus.UInt32(uid), dbus.UInt32(flags), authorized))
    return (authorized, False, dbus.Dictionary({}, signature="ss"))


@dbus.service.method(MAIN_IFACE, in_signature="(sa{sv})ss", out_signature="")
def RegisterAuthenticationAgent(_self, _subject, _locale, _object_path):
    pass


@dbus.service.method(TEST_IFACE, in_signature="", out_signature="a(suub)")
def GetChecks(self):
    """Every CheckAuthorization so far: (action id, subject uid, flags, authorized)."""
    return dbus.Array(self.checks, signature="(suub)")


@dbus.service.method(TEST_IFACE, in_signature="", out_signature="")
def ClearChecks(self):
    self.checks = []


@dbus.service.method(TEST_IFACE, in_signature="au", out_signature="")
def SetAllowedUids(self, uids):
    self.allowed_uids = {int(uid) for uid in uids}


@dbus.service.method(TEST_IFACE, in_signature="sau", out_signature="")
def SetActionUids(self, action_id, uids):
    """Decide `action_id` by its own uid list from now on (an empty list denies everyone)."""
    self.action_uids[str(action_id)] = {int(uid) for uid in uids}


@dbus.service.method(TEST_IFACE, in_signature="", out_signature="")
def ClearActionUids(self):
    self.action_uids = {}
