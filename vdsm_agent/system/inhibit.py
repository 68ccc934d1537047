"""A logind inhibitor lock: a reboot or suspend waits while a destructive task runs.

``org.freedesktop.login1.Manager.Inhibit(what, who, why, mode)`` answers with
a file descriptor; the lock lasts as long as that descriptor is open. A task
process takes it before its destructive work (``tasks/child.py``) and keeps
it until it exits, however it exits: the kernel closes the descriptor, and
logind drops the lock. The task process outlives agent restarts, and so does
the lock. ``systemd-inhibit --list`` shows it with the task's PID and what
it does, and a reboot that checks block locks is refused with a message
naming it: ``systemctl reboot`` by any other user (logind asks polkit), and
by root with ``--check-inhibitors=yes`` (systemd 252's systemctl does not
check for root by default, and logind lets root override its own locks).
A ``block`` lock, as udisks takes for its jobs: a ``delay`` lock would hold a
reboot for at most ``InhibitDelayMaxSec`` (5 s), nothing to a wipe
(docs/packaging.md, "Heavy work stays polite").

D-Bus is spoken by jeepney (pure Python, in Debian and Fedora), since the
answer carries a descriptor (``SCM_RIGHTS``): the lock is the task process's
own, no helper process holds it for it.
"""

from __future__ import annotations

import os

LOGIN1 = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
LOGIN1_MANAGER = "org.freedesktop.login1.Manager"
WHAT = "shutdown:sleep"  # reboot, power-off, halt, kexec; suspend and hibernate
WHO = "vdsm-agent"
MODE = "block"
TIMEOUT = 5.0  # seconds for the bus and logind to answer


class InhibitError(Exception):
    """No lock: no system bus, no logind, or logind said no (the message says which)."""


def take(why: str, what: str = WHAT, who: str = WHO, mode: str = MODE,
         timeout: float = TIMEOUT) -> int:
    """Take the lock; its file descriptor (close-on-exec: the tools a task runs do
    not inherit it). Close it to release the lock."""
    # Imported here: only a destructive task's process needs D-Bus.
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.wrappers import DBusErrorResponse, unwrap_msg

    try:
        connection = open_dbus_connection(bus="SYSTEM", enable_fds=True)
    except (OSError, KeyError, ValueError) as exc:
        raise InhibitError(f"no system bus: {exc}") from None
    try:
        manager = DBusAddress(LOGIN1_PATH, bus_name=LOGIN1, interface=LOGIN1_MANAGER)
        reply = connection.send_and_get_reply(
            new_method_call(manager, "Inhibit", "ssss", (what, who, why, mode)),
            timeout=timeout)
        (descriptor,) = unwrap_msg(reply)
        fd: int = descriptor.to_raw_fd()
    except DBusErrorResponse as exc:
        raise InhibitError(f"logind refused: {exc.name}: {' '.join(map(str, exc.data))}"
                           ) from None
    except (OSError, TimeoutError, ValueError) as exc:
        raise InhibitError(f"no answer from logind: {exc}") from None
    finally:
        connection.close()
    os.set_inheritable(fd, False)
    return fd
