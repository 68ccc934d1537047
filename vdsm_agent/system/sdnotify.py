"""systemd's service notifications (sd_notify(3)): READY, STOPPING, STATUS, WATCHDOG.

A ``Type=notify`` unit passes ``NOTIFY_SOCKET`` (a datagram socket: a path, or
``@name`` for an abstract one) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``
(and ``WATCHDOG_PID``). The protocol is one datagram of ``KEY=value`` lines
per notification, which is all this module writes: no library needed.

``Notifier.from_environment`` takes these variables out of the environment,
as ``sd_notify``'s ``unset_environment`` does, so that the processes the
daemon starts (the task zygote, task processes, mount helpers) cannot
notify in its name. Without ``NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call does nothing.

The watchdog is fed from the event loop (``start_watchdog``), at half the
interval systemd expects: a loop that stops turning (a blocking call, a
deadlock, SIGSTOP) stops the pings, and systemd kills and restarts the
daemon after ``WatchdogSec`` (docs/packaging.md; tasks survive it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._failed = False
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for, taking its variables out of ``environ``
        (``os.environ``: the daemon's children do not inherit them)."""
        env = os.environ if environ is None else environ
        address, usec, pid = (env.pop(name, None) for name in ENVIRONMENT)
        watchdog = None
        if usec and (not pid or pid == str(os.getpid())):  # WATCHDOG_PID: meant for us?
            try:
                watchdog = int(usec) or None
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return cls(address or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two watchdog pings (half of WatchdogSec), or None."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one notification; False if it could not be sent
        (said once in the log: the daemon runs on without systemd's view of it)."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
            self._socket.sendto("\n".join(lines).encode(), target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def start_watchdog(self) -> None:
        """Ping the watchdog from the running loop until ``stop_watchdog``."""
        interval = self.watchdog_interval
        if interval is None or self.address is None:
            return
        loop = asyncio.get_running_loop()

        def ping() -> None:
            self.notify("WATCHDOG=1")
            self._watchdog = loop.call_later(interval, ping)

        ping()

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
