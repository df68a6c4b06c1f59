"""CURVE keys, allow-lists and per-service rules: the pure half of zrpc's security (no sockets).

ZeroMQ's CURVE (RFC 26) encrypts and authenticates each connection; ZAP (RFC 27) lets the broker
decide which client keys it accepts. zrpc gives each broker socket its own ZAP domain, so the
frontend and the backend accept different keys: a client key cannot register as a worker, and a
worker key cannot call through the frontend.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import logging
import os
import pathlib
import tomllib
from typing import Mapping, Union

import zmq
import zmq.auth

FRONTEND_DOMAIN = "zrpc-frontend"
BACKEND_DOMAIN = "zrpc-backend"
# The built-in service (spec §13) answers every authenticated client: the CLI needs it to call.
ALWAYS_CALLABLE = ("zrpc.Broker",)

_Z85_KEY_LENGTH = 40
_log = logging.getLogger("zrpc.security")


@dataclasses.dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, both halves z85-encoded (40 ASCII bytes each)."""

    public: bytes
    secret: bytes


KeySource = Union[str, os.PathLike, KeyPair, tuple]


def generate_keys(name: str, directory: str | os.PathLike = ".") -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) in ``directory``.

    ``zmq.auth.create_certificates`` writes the secret file with the process umask (usually
    world-readable); we tighten it before returning, and create it under a 077 umask so it is
    never readable by others, not even for a moment.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"bad key name {name!r}: use a plain file name such as 'broker'")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return pathlib.Path(public), pathlib.Path(secret)


def load_keypair(source: KeySource, warn: bool = True) -> KeyPair:
    """A key pair from a ``.key_secret`` file path, a ``KeyPair`` or a ``(public, secret)`` tuple.
    ``warn``: log when the file is readable by other users."""
    if isinstance(source, KeyPair):
        return source
    if isinstance(source, tuple):
        public, secret = (k.encode() if isinstance(k, str) else bytes(k) for k in source)
        return KeyPair(_check_z85(public, "public key"), _check_z85(secret, "secret key"))
    public, secret = _load_certificate(source)
    if secret is None:
        raise ValueError(f"{os.fspath(source)} holds no secret key (pass the NAME.key_secret file)")
    if warn:
        _warn_if_readable_by_others(source)
    return KeyPair(public, _check_z85(secret, f"secret key in {os.fspath(source)}"))


def check_key_files(curve_secret: str | None, broker_key: str | None) -> list[str]:
    """Raise ValueError, as connecting would, for a key file (or z85 key) that cannot be read;
    return what is usable but suspect (a secret key where the broker's public one goes)."""
    if curve_secret is not None:
        load_keypair(curve_secret, warn=False)  # connecting warns, once
    if broker_key is None:
        return []
    if not os.path.isfile(broker_key):  # a z85 key, or what load_public_key will say is wrong
        load_public_key(broker_key)
        return []
    if _load_certificate(broker_key)[1] is not None:  # read once: load_public_key reads it so too
        # It works (its public half is read), but the broker's secret key has left the broker.
        return [f"{os.fspath(broker_key)} holds the broker's secret key: clients and workers need only its "
                f"public NAME.key file; keep the secret one on the broker's host"]
    return []


def _warn_if_readable_by_others(path: str | os.PathLike) -> None:
    """A secret key others may read is a key others may hold: say so (it is written 0600)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        _log.warning("secret key file %s has mode %o: other users may read it; `chmod 600 %s`",
                     os.fspath(path), mode & 0o777, os.fspath(path))


def load_public_key(source: str | os.PathLike | bytes) -> bytes:
    """A public key from a certificate file (public or secret) or a z85 string of 40 characters."""
    if isinstance(source, bytes):
        return _check_z85(source, "public key")
    text = os.fspath(source)
    if len(text) == _Z85_KEY_LENGTH and not os.path.exists(text):
        return _check_z85(text.encode(), "public key")
    return _load_certificate(text)[0]


def _load_certificate(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE key from {os.fspath(path)}: {exc}") from None
    return _check_z85(public, f"public key in {os.fspath(path)}"), secret


def _check_z85(key: bytes, what: str) -> bytes:
    if len(key) != _Z85_KEY_LENGTH:
        raise ValueError(f"bad {what}: expected 40 z85 characters, got {len(key)}")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError):
        raise ValueError(f"bad {what}: not z85") from None
    return key


def load_allow_list(directory: str | os.PathLike) -> dict[str, str]:
    """Public keys in ``directory`` (every ``*.key`` file): z85 key -> name (the file's stem)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ValueError(f"key directory {directory} does not exist")
    keys: dict[str, str] = {}
    for path in sorted(directory.glob("*.key")):
        keys[load_public_key(path).decode("ascii")] = path.stem
    return keys


class AccessPolicy:
    """Who may connect on each side, and which services each key may call or offer.

    ``clients`` and ``workers`` map z85 public keys to names. ``rules`` (from a TOML file, see
    ``load_rules``) maps ``"clients"``/``"workers"`` to {name or z85 key or "*": [service
    patterns]}; a side missing from ``rules`` is unrestricted. Keys are strings as the ZAP
    handler hands them over (the frame property ``User-Id``).
    """

    def __init__(self, clients: Mapping[str, str], workers: Mapping[str, str],
                 rules: Mapping[str, Mapping[str, list[str]]] | None = None):
        self.clients = dict(clients)
        self.workers = dict(workers)
        self.rules = {side: {k: list(v) for k, v in table.items()} for side, table in (rules or {}).items()}

    def client_allowed(self, key: str | None) -> bool:
        return key in self.clients

    def worker_allowed(self, key: str | None) -> bool:
        return key in self.workers

    def may_call(self, key: str | None, service: str) -> bool:
        if service in ALWAYS_CALLABLE:
            return True
        return self._permits("clients", key, self.clients.get(key, ""), service)

    def call_refusal(self, key: str | None, service: str) -> str:
        """Why ``key`` may not call ``service`` (PERMISSION_DENIED's message), or "" if it may."""
        if self.may_call(key, service):
            return ""
        return f"key {self.name(key)!r} may not call service {service!r} (broker access rules)"

    def may_offer(self, key: str | None, service: str) -> bool:
        return self._permits("workers", key, self.workers.get(key, ""), service)

    def name(self, key: str | None) -> str:
        return self.clients.get(key) or self.workers.get(key) or str(key)

    def _permits(self, side: str, key: str | None, name: str, service: str) -> bool:
        table = self.rules.get(side)
        if table is None:
            return True
        patterns = [*table.get(name, ()), *table.get(key or "", ()), *table.get("*", ())]
        return any(fnmatch.fnmatchcase(service, pattern) for pattern in patterns)


def load_rules(path: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """Read a rules file: ``[clients]`` and ``[workers]`` tables of ``name = ["service", ...]``.

    Names are key file stems in the allow-list directories (``alice.key`` -> ``alice``), z85
    public keys, or ``"*"`` for every key; services are names or shell patterns (``"echo.*"``).
    """
    with open(path, "rb") as f:
        try:
            document = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:  # a ValueError that names no file
            raise ValueError(f"{os.fspath(path)}: not valid TOML: {exc}") from None
    rules: dict[str, dict[str, list[str]]] = {}
    for side, table in document.items():
        if side not in ("clients", "workers"):
            raise ValueError(f"{path}: unknown table [{side}]; expected [clients] and/or [workers]")
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{side}] must be a table of name = [services]")
        for name, services in table.items():
            if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
                raise ValueError(f"{path}: [{side}] {name} must be a list of service names")
        rules[side] = {name: list(services) for name, services in table.items()}
    return rules


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for endpoints only this host can reach: ipc, inproc, tcp on a loopback address."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport not in ("tcp", "ws", "wss"):
        return False
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.split(";")[-1].strip("[]")  # "src;dest" form binds to dest; [::1] brackets
    if host == "localhost" or host == "lo":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name, a host name: reachable from elsewhere


def allow_ipv6_for(socket: zmq.Socket, endpoints) -> None:
    """Turn on IPv6 for a socket that binds or connects to an IPv6 literal (``tcp://[::1]:5555``).

    ZeroMQ leaves IPv6 off, and then fails such an endpoint with "No such device". Only for
    literals: with it on, a host name such as localhost may resolve to ::1 where the peer listens
    on 127.0.0.1 only, and never connect.
    """
    if any("://[" in endpoint or ";[" in endpoint for endpoint in endpoints):
        socket.setsockopt(zmq.IPV6, 1)


def apply_client_curve(socket: zmq.Socket, keypair: KeyPair, broker_key: bytes) -> None:
    """Make ``socket`` a CURVE client of the broker whose public key is ``broker_key``."""
    socket.curve_secretkey = keypair.secret
    socket.curve_publickey = keypair.public
    socket.curve_serverkey = broker_key


def client_security(curve_secret: KeySource | None, broker_key) -> tuple[KeyPair, bytes] | None:
    """Check a client's or worker's pair of security arguments: both or neither."""
    if curve_secret is None and broker_key is None:
        return None
    if curve_secret is None or broker_key is None:
        raise ValueError("CURVE needs both curve_secret (our key pair) and broker_key "
                         "(the broker's public key)")
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE support")
    return load_keypair(curve_secret), load_public_key(broker_key)
