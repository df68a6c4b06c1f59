"""Broker settings: one dataclass, read from flags, environment or a TOML file."""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import tomllib
from typing import Any, Collection

from .. import _protocol as p
from .._endpoints import endpoint_port, endpoint_problem
from .._polling import busy_poll_problem

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"

_ANY_PORT = ("0", "*")  # bind to a free port: two such endpoints never clash


def _same_endpoint(first: str, second: str) -> bool:
    """Do two endpoints name one address? ipc paths are compared as absolute, normalised paths
    (ipc:///tmp/./x, ipc:////tmp/x and, from /tmp, ipc://x are ipc:///tmp/x): libzmq would bind
    the second over the first, and clients would reach nothing. Abstract names (@) as written."""
    first, second = first.strip(), second.strip()
    if first.startswith("ipc://") and second.startswith("ipc://"):
        return _ipc_address(first[len("ipc://"):]) == _ipc_address(second[len("ipc://"):])
    return first == second


def _ipc_address(path: str) -> str:
    if path.startswith("@"):  # Linux's abstract namespace: a name, not a path
        return path
    return "/" + os.path.abspath(path).lstrip("/")


class SettingError(ValueError):
    """A setting that cannot work; ``settings`` names the setting(s) at fault, so that a caller
    that merged several sources (a config file, flags) can say which one to fix."""

    def __init__(self, message: str, *settings: str):
        super().__init__(message)
        self.settings = settings


@dataclasses.dataclass(slots=True)
class BrokerConfig:
    """Everything a broker can be told. Times are seconds; sizes are bytes or counts."""

    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    # A worker is expired after liveness x its announced heartbeat interval of silence.
    heartbeat_liveness: int = 3
    # Calls may wait this long for a worker of a known service that has none alive.
    unavailable_wait: float = 5.0
    # After start, calls to a service nobody has offered wait this long before NOT_FOUND
    # (workers re-register after a broker restart within a couple of heartbeats).
    unknown_service_grace: float = 3.0
    # Bounds on every table and queue (spec §12).
    queue_size: int = 10_000
    max_in_flight: int = 100_000
    max_outstanding_per_client: int = 10_000
    max_workers: int = 10_000
    max_services: int = 1_000
    # Messages of answers queued at the broker for one client that does not read them (ZeroMQ's
    # send high-water mark on the frontend). A client's answers of one loop turn leave together,
    # so a reading client never comes near it; past it the client's new calls are refused for a
    # second (RESOURCE_EXHAUSTED): an adversarial tester's client that never read held 100,000
    # messages, 3.4 GB in 12 s with 1 MiB answers.
    client_queue_messages: int = 1_000
    # Per call (header + payload) or reply; READY and DISCONNECT as a whole (spec §9).
    max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES
    max_frames: int = 2_049
    # Connections each endpoint holds at once; one more is refused (closed) as soon as libzmq
    # accepts it. 0: automatic, min(10000, (fd limit - 512) / 2), so that a connection flood never
    # exhausts the process's file descriptors (see _connections.py).
    max_connections: int = 0
    # A connection that has not completed the ZeroMQ handshake by then is closed (a peer that
    # connects and says nothing does not hold its descriptor for libzmq's default 30 s).
    handshake_timeout: float = 5.0
    # How often the loop checks deadlines and heartbeats when no message arrives.
    tick_interval: float = 0.05
    # On SIGTERM or SIGINT (`zrpc broker start`), calls held may be answered for this long while
    # new ones are refused UNAVAILABLE (zrpc-retry: draining); a second signal stops at once.
    drain_grace: float = 10.0
    # After a call's message, keep polling without sleeping for this long (0: off). A sleeping loop
    # pays a thread wake-up and cold caches per message; polling costs a core while traffic
    # lasts and nothing once it stops (README "Busy polling").
    busy_poll: float = 0.0
    # CURVE (zrpc keys generate): the broker's NAME.key_secret, and directories of the public
    # keys (*.key) admitted on the frontend (clients) and on the backend (workers); optional
    # TOML rules of which key may call or offer which service. Empty: plain TCP, no keys.
    curve_secret: str = ""
    client_keys: str = ""
    worker_keys: str = ""
    access_rules: str = ""
    log_level: str = "INFO"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes: Any) -> "BrokerConfig":
        """A copy with ``changes`` applied; ``None`` values are ignored (flags not given)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validate(self) -> None:
        """Raise SettingError (a ValueError) naming the first setting that cannot work."""
        for field in dataclasses.fields(self):
            # A config file can hold any TOML value: `queue_size = "5"` or `busy_poll = true`
            # would fail later with a TypeError, or (a bool is an int) pass as 1.
            default, value = field.default, getattr(self, field.name)
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or isinstance(value, float) and not math.isfinite(value)):
                raise SettingError(f"{field.name} must be a finite number, not {value!r}", field.name)
            if isinstance(default, int) and not isinstance(value, int):
                raise SettingError(f"{field.name} must be a whole number, not {value!r}", field.name)
        if self.heartbeat_liveness < 1:
            raise SettingError("heartbeat_liveness must be at least 1", "heartbeat_liveness")
        for name in ("queue_size", "max_in_flight", "max_outstanding_per_client", "max_workers",
                     "max_services", "max_message_bytes", "max_frames", "client_queue_messages"):
            if getattr(self, name) < 1:
                raise SettingError(f"{name} must be at least 1", name)
        if self.max_message_bytes > p.MAX_MESSAGE_BYTES_LIMIT:
            raise SettingError(f"max_message_bytes must be at most {p.MAX_MESSAGE_BYTES_LIMIT} (1 TiB)",
                               "max_message_bytes")
        if self.max_frames < p.MIN_FRAMES_LIMIT:
            # Lower, a client's request or a worker's replies would be refused whole.
            raise SettingError(f"max_frames must be at least {p.MIN_FRAMES_LIMIT}: clients and workers send up "
                               f"to {p.MAX_CALLS_PER_MESSAGE} calls, 2 frames each, in one message", "max_frames")
        if self.max_connections < 0:
            raise SettingError("max_connections must not be negative (0: automatic)", "max_connections")
        if self.handshake_timeout <= 0:
            raise SettingError("handshake_timeout must be positive", "handshake_timeout")
        for name in ("unavailable_wait", "unknown_service_grace", "drain_grace"):
            if getattr(self, name) < 0:
                raise SettingError(f"{name} must not be negative, not {getattr(self, name)!r}", name)
        if (problem := busy_poll_problem(self.busy_poll)) is not None:
            raise SettingError(problem, "busy_poll")
        if self.tick_interval <= 0:
            raise SettingError("tick_interval must be positive", "tick_interval")
        for name in ("frontend", "backend"):
            problem = endpoint_problem(getattr(self, name))
            if problem:
                raise SettingError(f"{name} {getattr(self, name)!r}: {problem}", name)
        if _same_endpoint(self.frontend, self.backend) and endpoint_port(self.frontend) not in _ANY_PORT:
            # Caught here, the second bind would only say "Address already in use".
            raise SettingError(f"frontend and backend are the same endpoint {self.frontend}: "
                               f"clients and workers need one each", "frontend", "backend")
        if self.curve_secret and not (self.client_keys and self.worker_keys):
            # Without allow-lists CURVE would encrypt but admit any key.
            raise SettingError("curve_secret needs client_keys and worker_keys (directories of public keys)",
                               "curve_secret", "client_keys", "worker_keys")
        if not self.curve_secret and (self.client_keys or self.worker_keys or self.access_rules):
            raise SettingError("client_keys, worker_keys and access_rules need curve_secret",
                               "curve_secret", "client_keys", "worker_keys", "access_rules")


# Settings that name files: a relative path in a config file is relative to that file's
# directory (as the shipped zrpc-broker.toml is read from /etc/zrpc by a unit whose working
# directory is another), not to wherever the broker happens to be started.
_PATH_SETTINGS = ("curve_secret", "client_keys", "worker_keys", "access_rules")


def load_config_file(path: str | pathlib.Path, extra: Collection[str] = ()) -> dict[str, Any]:
    """Read the ``[broker]`` table of a TOML file into BrokerConfig keyword arguments, plus the
    ``extra`` keys (settings of the process around the broker, for its caller to take out).

    Keys may use dashes or underscores. An unknown key or table, inside the table or out, is
    an error that names it, so a typo in a deployment file is caught at start-up rather than
    silently ignored.
    """
    with open(path, "rb") as f:
        document = tomllib.load(f)
    if "broker" in document:
        table = document["broker"]
        outside = [key for key in document if key != "broker"]
    else:  # a file of bare settings, with no table at all
        table = document
        outside = [key for key, value in document.items() if isinstance(value, dict)]
    if outside:
        # Read by nobody: `queue_size = 5` above the [broker] table looks set but is not.
        key = outside[0]
        what = f"table [{key}]" if isinstance(document[key], dict) else f"key {key!r} outside the [broker] table"
        raise ValueError(f"{path}: unknown {what}; every setting goes in the [broker] table")
    if not isinstance(table, dict):
        raise ValueError(f"{path}: broker must be a table ([broker]), not {type(table).__name__}")
    known = set(BrokerConfig.field_names()) | set(extra)
    settings: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        if name in _PATH_SETTINGS and isinstance(value, str) and value and not pathlib.Path(value).is_absolute():
            value = str(pathlib.Path(path).resolve().parent / value)
        settings[name] = value
    return settings
