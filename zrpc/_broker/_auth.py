"""The broker's CURVE set-up: its key pair, the ZAP handler, and allow-lists it can reload.

Measured pitfalls this module is built around (issue 5):
- CURVE with no ZAP handler accepts ANY client key: the handler starts before the sockets bind,
  and ``Broker.bind`` refuses to go on unless it is running;
- ``configure_curve(domain='*')`` does not cover a socket with its own ``zap_domain`` (pyzmq
  looks the domain up literally), so we configure exactly FRONTEND_DOMAIN and BACKEND_DOMAIN;
- ZAP runs only at the handshake, so removing a key does not close that peer's connection:
  the engine checks each message's ``User-Id`` against the current policy.
"""
from __future__ import annotations

import collections
import logging
import pathlib
import threading

import zmq
import zmq.auth.thread

from .. import _security as s

log = logging.getLogger("zrpc.broker")


class _AllowListProvider:
    """ZAP credentials provider for one domain: is this z85 key in the current allow-list?"""

    def __init__(self, security: "BrokerSecurity", domain: str):
        self._security = security
        self._domain = domain

    def callback(self, domain: str, key: bytes) -> bool:
        policy = self._security.policy  # one attribute read: a reload swaps it whole
        text = key.decode("ascii", "replace")
        allowed = policy.client_allowed(text) if self._domain == s.FRONTEND_DOMAIN else policy.worker_allowed(text)
        if not allowed:
            self._security.count_refusal(domain, text)
        return allowed


class _Authenticator(zmq.auth.thread.ThreadAuthenticator):
    """pyzmq's ZAP thread; refusals of other kinds (bad domain, bad request) are counted too."""

    def __init__(self, context: zmq.Context, security: "BrokerSecurity"):
        super().__init__(context, log=logging.getLogger("zrpc.broker.zap"))
        self._security = security

    async def _authenticate_curve(self, domain: str, client_key: bytes):
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed and domain not in (s.FRONTEND_DOMAIN, s.BACKEND_DOMAIN):
            self._security.count_refusal(domain or "(none)", zmq.utils.z85.encode(client_key).decode())
        return allowed, reason


class BrokerSecurity:
    """The broker's key pair, its allow-lists and rules (reloadable), and its ZAP handler."""

    def __init__(self, curve_secret: str, client_keys: str, worker_keys: str, rules_file: str = ""):
        self.keypair = s.load_keypair(curve_secret)
        self.client_keys_dir = client_keys
        self.worker_keys_dir = worker_keys
        self.rules_file = rules_file
        self.policy = self._load_policy()
        self.refusals: collections.Counter[str] = collections.Counter()  # by ZAP domain
        self._refusal_lock = threading.Lock()
        self._refusal_logged: dict[str, int] = {}
        self._authenticator: _Authenticator | None = None

    def _load_policy(self) -> s.AccessPolicy:
        rules = s.load_rules(self.rules_file) if self.rules_file else None
        policy = s.AccessPolicy(s.load_allow_list(self.client_keys_dir),
                                s.load_allow_list(self.worker_keys_dir), rules)
        # An empty directory is valid (keys may come later, with SIGHUP) but almost always a
        # wrong path: say so, since every handshake on that side would be refused.
        for side, directory, admitted in (("client", self.client_keys_dir, policy.clients),
                                          ("worker", self.worker_keys_dir, policy.workers)):
            if not admitted:
                log.warning("%s allow-list %s holds no *.key files: every %s will be refused; "
                            "copy their NAME.key files there and send SIGHUP", side, directory, side)
            # Secret keys in an allow-list: a tester gave the directory `zrpc keys generate` wrote
            # into, and every key made there (the broker's, the workers') was admitted as a client.
            secrets = sorted(path.name for path in pathlib.Path(directory).glob("*.key_secret"))
            if secrets:
                log.warning("%s allow-list %s holds secret keys (%s): it admits every key made there; keep "
                            "secret keys elsewhere and only the peers' NAME.key files here", side, directory,
                            ", ".join(secrets[:5]) + (" ..." if len(secrets) > 5 else ""))
        # A rule's name that matches no key admits or forbids nobody: a tester's typo `alcie` was
        # found only when alice's calls were denied.
        for side, names in (("clients", policy.clients), ("workers", policy.workers)):
            unknown = [name for name in (rules or {}).get(side, {})
                       if name != "*" and name not in names.values() and name not in names]
            if unknown:
                log.warning("access rules %s: [%s] names %s, which match no key in the %s allow-list (it holds: %s)",
                            self.rules_file, side, ", ".join(repr(n) for n in unknown), side[:-1],
                            ", ".join(sorted(names.values())) or "none")
        return policy

    def reload(self) -> s.AccessPolicy:
        """Read the allow-lists and rules again; new handshakes see them at once. On an error
        (a bad file) the old policy stays and the error is raised."""
        policy = self._load_policy()
        self.policy = policy
        log.info("security reloaded: %d client keys, %d worker keys%s", len(policy.clients),
                 len(policy.workers), f", rules from {self.rules_file}" if self.rules_file else "")
        return policy

    def count_refusal(self, domain: str, key: str) -> None:
        with self._refusal_lock:
            self.refusals[domain] += 1
            count = self.refusals[domain]
        # A flood of bad handshakes must not become a flood of log lines: 1, 2, 4, 8 ... logged.
        if count & (count - 1) == 0:
            log.warning("handshake refused on %s: key %s is not allowed (%d refusals so far)",
                        domain, key, count)

    # ------------------------------------------------------------------ ZAP handler

    def start(self, context: zmq.Context) -> None:
        """Start the ZAP handler on ``context``; raise unless it runs (never CURVE without it)."""
        authenticator = _Authenticator(context, self)
        authenticator.start()
        authenticator.configure_curve_callback(s.FRONTEND_DOMAIN, _AllowListProvider(self, s.FRONTEND_DOMAIN))
        authenticator.configure_curve_callback(s.BACKEND_DOMAIN, _AllowListProvider(self, s.BACKEND_DOMAIN))
        self._authenticator = authenticator
        if not self.running:
            self.stop()
            raise RuntimeError("the ZAP authenticator is not running: refusing to serve CURVE "
                               "without it (CURVE without ZAP accepts any key)")

    @property
    def running(self) -> bool:
        return self._authenticator is not None and self._authenticator.is_alive()

    @property
    def domains(self) -> tuple[str, ...]:
        """The ZAP domains the handler is configured for."""
        if self._authenticator is None:
            return ()
        return tuple(self._authenticator.credentials_providers)

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def make_server(self, socket: zmq.Socket, domain: str) -> None:
        """Make ``socket`` a CURVE server whose peers ZAP checks under ``domain``."""
        socket.zap_domain = domain.encode()
        socket.curve_secretkey = self.keypair.secret
        socket.curve_publickey = self.keypair.public
        socket.curve_server = True
