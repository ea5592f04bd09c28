"""systemd's readiness protocol (``Type=notify``): a datagram to ``$NOTIFY_SOCKET``.

The whole protocol is one ``sendto`` of ``KEY=value`` lines (sd_notify(3)); no library is
needed for it.  Without ``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent.  Errors are
swallowed: a readiness message must never stop the proxy.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``STATUS=…`` lines; whether a message was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not lines:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True
