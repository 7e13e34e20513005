"""Loopback ports for the servers the tests start (SeaweedFS, sshd, SMTP, HTTP).

A port the kernel hands out for `bind(("127.0.0.1", 0))` comes from its ephemeral range, the
range every outgoing connection takes its local port from too: between the moment a test
closes the probe socket and the moment its server binds the port, another xdist worker's
probe or any connection of the suite may take it, and the server fails to start. So ports
come from below the ephemeral range instead, from a block of their own per xdist worker, in
turn; a port something already holds is skipped.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator

BASE = 20000
BLOCK = 500  # ports per xdist worker


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = BASE + (int(worker) if worker.isdigit() else 0) * BLOCK
    if start + BLOCK > _ephemeral_low():
        raise RuntimeError(
            f"xdist worker {worker}: ports {start}-{start + BLOCK} reach into the ephemeral "
            "range (/proc/sys/net/ipv4/ip_local_port_range): run fewer workers"
        )
    return range(start, start + BLOCK)


def _candidates() -> Iterator[int]:
    return itertools.cycle(_block())


_ports = _candidates()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on, that no other worker and no outgoing connection
    will take."""
    for _ in range(BLOCK):
        port = next(_ports)
        if _bindable(port):
            return port
    raise RuntimeError(f"no free loopback port left in {_block()}")


def free_ports(count: int) -> list[int]:
    """`count` different ports, as free_port."""
    return [free_port() for _ in range(count)]
