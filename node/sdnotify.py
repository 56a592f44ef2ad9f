"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (a no-op when it is unset)."""
from __future__ import annotations

import os
import socket
from typing import Optional


class Notifier:
    def __init__(self, address: Optional[str] = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: Optional[socket.socket] = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            if self.address.startswith("@"):  # abstract namespace
                self.address = "\0" + self.address[1:]

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, text: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto(text.encode(), self.address)
            return True
        except OSError:  # systemd gone or socket full: readiness reporting must never kill the node
            return False

    def watchdog_interval_s(self) -> Optional[float]:
        """Half of WATCHDOG_USEC (systemd's advice), or None when no watchdog is asked for."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
