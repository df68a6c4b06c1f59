"""What a ZeroMQ endpoint must look like: one check for the broker's settings, clients, workers
and the command line, so that each says the same thing about the same mistake, and says it
before libzmq does (its ``Invalid argument`` names neither the problem nor the form expected)."""
from __future__ import annotations

import ipaddress
import os
import re
from typing import Sequence

# libzmq's transports; any other name fails at bind or connect with "Protocol not supported".
TRANSPORTS = ("tcp", "ipc", "inproc", "pgm", "epgm", "norm", "ws", "wss", "tipc", "vmci", "udp")
EXPECTED = "expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555 or ipc:///tmp/zrpc-frontend"
_FORM = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$")

# Transports whose address ends in :PORT (ws and wss may add a /path after it).
_PORTED_TRANSPORTS = ("tcp://", "udp://", "ws://", "wss://")


def endpoint_problem(endpoint: str, connect: bool = False) -> str | None:
    """What is wrong with ``endpoint``, for a person, or None. ``connect``: it is to connect to
    (a broker's address), so the wildcards only a bind understands are wrong too."""
    match = _FORM.match(endpoint.strip())
    if match is None:
        # HOST:PORT without a transport: say the endpoint meant, not an example of the other side's
        # (a tester's worker given 127.0.0.1:17556 was shown the clients' tcp://127.0.0.1:5555).
        if re.fullmatch(r"[\w.\-]+:[0-9]{1,5}|\[[0-9a-fA-F:.]+\]:[0-9]{1,5}", endpoint.strip()):
            return f"{EXPECTED} (did you mean tcp://{endpoint.strip()}?)"
        return EXPECTED
    if match.group(1) not in TRANSPORTS:
        return f"unknown transport {match.group(1)!r}; {EXPECTED}"
    problem = endpoint_port_problem(endpoint)
    if problem is None and connect and endpoint.strip().startswith(_PORTED_TRANSPORTS):
        host, port = endpoint_host_port(endpoint)
        if host == "*" or port in ("*", "0"):
            # libzmq answers "Invalid argument", or connects to port 0 and waits forever.
            return ("a wildcard (* or port 0) is for binding; connect to the broker's address and port, "
                    "e.g. tcp://127.0.0.1:5555")
    return problem


def endpoint_host_port(endpoint: str) -> tuple[str, str] | None:
    """The HOST and PORT texts of a tcp/udp/ws/wss endpoint, as written (``None`` for other
    transports or no port)."""
    endpoint = endpoint.strip()
    transport = next((t for t in _PORTED_TRANSPORTS if endpoint.startswith(t)), None)
    if transport is None:
        return None
    address = endpoint[len(transport):]
    if transport.startswith("ws"):
        address = address.split("/", 1)[0]
    host, sep, port = address.rpartition(":")
    if "]" in port:  # tcp://[::1]: the last colon is inside an IPv6 literal, and no port follows
        return None
    return (host, port) if sep and host else None


def endpoint_port(endpoint: str) -> str | None:
    """The PORT text of a tcp/udp/ws/wss endpoint (``None`` for other transports or no port)."""
    host_port = endpoint_host_port(endpoint)
    return None if host_port is None else host_port[1]


def tcp_host_name(endpoint: str) -> str | None:
    """The host name of a ``tcp://HOST:PORT`` endpoint, or None: another transport, no host, or
    an address (which needs no lookup)."""
    host_port = endpoint_host_port(endpoint) if endpoint.strip().startswith("tcp://") else None
    if host_port is None:
        return None
    host = host_port[0].rpartition(";")[2]  # libzmq: [source;]host:port
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or host == "*":
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def endpoint_port_problem(endpoint: str) -> str | None:
    """What is wrong with the port of a tcp/udp/ws/wss endpoint, or None (also for other transports).

    libzmq reads the port modulo 65536, so tcp://127.0.0.1:99999 would bind port 34463.
    """
    if not endpoint.strip().startswith(_PORTED_TRANSPORTS):
        return None
    port = endpoint_port(endpoint)
    if port is None:
        return "no port: expected HOST:PORT, e.g. tcp://127.0.0.1:5555"
    if port != "*" and not (re.fullmatch(r"[0-9]{1,5}", port) and int(port) <= 65535):
        return f"port {port!r} is not a number from 0 to 65535 (or *)"
    return None


def endpoint_list(endpoints: str | Sequence[str], what: str = "broker endpoint", connect: bool = True) -> list[str]:
    """One endpoint or several, as a non-empty list of checked strings, each once (a second
    connection to one broker would only double its share); ValueError names the first bad one
    and what is wrong with it."""
    found = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if not found or not all(isinstance(e, str) and e.strip() for e in found):
        raise ValueError(f"endpoints must be a non-empty string or list of strings, got {endpoints!r}")
    found = [endpoint.strip() for endpoint in found]  # libzmq would refuse the spaces, unexplained
    for endpoint in found:
        problem = endpoint_problem(endpoint, connect)
        if problem:
            raise ValueError(f"bad {what} {endpoint!r}: {problem}")
    return list(dict.fromkeys(found))


def ipc_socket_file(endpoint: str) -> tuple[str, tuple[int, int]] | None:
    """The file a bound ``ipc://`` endpoint made, with its (device, inode); None for any other
    endpoint, the abstract namespace (``ipc://@name``) or a file that is not there."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    path = endpoint[len("ipc://"):]
    try:
        status = os.stat(path)
    except OSError:
        return None
    return path, (status.st_dev, status.st_ino)


def remove_ipc_socket_file(bound: tuple[str, tuple[int, int]] | None) -> None:
    """Remove a socket file ``ipc_socket_file`` found at bind time, as its socket closes: libzmq
    4.3 leaves it behind (a tester found them after every clean stop). Only if it is still the
    same file: a process that bound the path since owns the one there now."""
    if bound is None:
        return
    path, identity = bound
    try:
        status = os.stat(path)
        if (status.st_dev, status.st_ino) == identity:
            os.unlink(path)
    except OSError:  # gone already, or not ours to remove
        pass
