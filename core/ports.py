"""Free loopback ports for servers we start (the demo, the tests)."""

from __future__ import annotations

import contextlib
import socket


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now: all sockets are held open together, so
    the kernel cannot hand the same port out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
