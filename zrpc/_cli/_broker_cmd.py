"""``zrpc broker start``: run a broker in the foreground until SIGINT or SIGTERM."""
from __future__ import annotations

import logging
import signal
import socket
import tomllib

import click

from .. import _protocol as p
from .._allocator import tune_allocator
from .._broker._config import BrokerConfig, SettingError, load_config_file
from .._endpoints import endpoint_host_port, endpoint_port, ipc_socket_file
from .._polling import MAX_BUSY_POLL
from ._common import (DEFAULT_BACKEND, DEFAULT_FRONTEND, EXIT_CODES_HELP, EXIT_USAGE, LOG_LEVELS, CliError,
                      FiniteRange, blamed, check_endpoint, log_format_option, metrics_host_option,
                      metrics_port_option, option, ready_line, setup_logging, start_metrics,
                      variables_not_read)

log = logging.getLogger("zrpc.cli")


@click.group()
def broker() -> None:
    """Run the broker that clients and workers connect to."""


@broker.command(epilog=EXIT_CODES_HELP)
@option("--frontend", metavar="ENDPOINT", show_default=DEFAULT_FRONTEND,
        help="Endpoint clients connect to (tcp port 0 picks a free port).")
@option("--backend", metavar="ENDPOINT", show_default=DEFAULT_BACKEND,
        help="Endpoint workers connect to.")
@option("--config", "config_file", metavar="FILE", envvar="ZRPC_BROKER_START_CONFIG",
        type=click.Path(exists=True, dir_okay=False),
        help="TOML file with a [broker] table (see broker/zrpc-broker.toml); flags win over it.")
@option("--queue-size", type=click.IntRange(min=1), metavar="N", show_default="10000",
        help="Calls each service may queue before callers get RESOURCE_EXHAUSTED.")
@option("--heartbeat-liveness", type=click.IntRange(min=1), metavar="N", show_default="3",
        help="A worker silent for N of its heartbeat intervals is expired.")
@option("--unavailable-wait", type=FiniteRange(min=0), metavar="SECONDS", show_default="5.0",
        help="How long calls wait for a worker of a known service that has none alive.")
@option("--unknown-service-grace", type=FiniteRange(min=0), metavar="SECONDS",
        show_default="3.0",
        help="After start, calls to a service never offered wait this long before NOT_FOUND.")
@option("--max-in-flight", type=click.IntRange(min=1), metavar="N", show_default="100000",
        help="Calls the broker holds at once (queued + dispatched), all services together.")
@option("--max-message-bytes", type=click.IntRange(min=1, max=p.MAX_MESSAGE_BYTES_LIMIT), metavar="BYTES", show_default="67108864",
        help="Largest call (header and payload) accepted from a client, or reply from a worker.")
@option("--max-connections", type=click.IntRange(min=0), metavar="N", show_default="0 (automatic)",
        help="Connections each endpoint holds at once; more are refused as they arrive. "
             "0: min(10000, (file descriptor limit - 512) / 2).")
@option("--drain-grace", type=FiniteRange(min=0), metavar="SECONDS", show_default="10.0",
        help="On SIGTERM or SIGINT, answer the calls held for up to this long, refusing new ones "
             "(UNAVAILABLE, zrpc-retry: draining); a second signal stops at once.")
@option("--busy-poll", type=FiniteRange(min=0, max=MAX_BUSY_POLL), metavar="SECONDS", show_default="0 (off)",
        help="After a call's message, poll without sleeping this long (0: off): lower latency at "
             "light load, for a core kept busy while calls come.")
@option("--curve-secret", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
        help="The broker's NAME.key_secret (zrpc keys generate): turns on CURVE; needs the two "
             "key directories.")
@option("--client-keys", metavar="DIR", type=click.Path(exists=True, file_okay=False),
        help="Directory of client public keys (*.key) admitted on the frontend.")
@option("--worker-keys", metavar="DIR", type=click.Path(exists=True, file_okay=False),
        help="Directory of worker public keys (*.key) admitted on the backend.")
@option("--access-rules", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
        help="TOML rules: which keys may call ([clients]) or offer ([workers]) which services.")
@option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), show_default="INFO",
        help="Log threshold; logs go to stderr.")
@log_format_option
@metrics_port_option
@metrics_host_option
def start(config_file: str | None, log_level: str | None, log_format: str, metrics_port: int | None,
          metrics_host: str, **flags) -> None:
    """Start a broker and serve until SIGINT or SIGTERM (then exit 0).

    Settings come from flags, then ZRPC_BROKER_START_* variables, then --config, then defaults.
    Once both sockets are bound, prints one line to stdout:

    \b
      zrpc broker ready: frontend=<endpoint> backend=<endpoint> [metrics=<url>]
    """
    from_file, process_from_file = _read_config_file(config_file)
    config = _build_config(config_file, from_file, log_level=log_level.upper() if log_level else None, **flags)
    process = _process_settings(config_file, process_from_file, log_format=log_format,
                                metrics_port=metrics_port, metrics_host=metrics_host)
    log_format, metrics_port, metrics_host = process["log_format"], process["metrics_port"], process["metrics_host"]
    setup_logging(config.log_level, log_format)
    for variable in variables_not_read(click.get_current_context()):
        setting = variable[len("ZRPC_BROKER_START_"):].lower()
        log.warning("%s is not read by `zrpc broker start` and is ignored%s", variable,
                    f": {setting} is set in the config file (--config)" if setting in BrokerConfig.field_names() else "")
    tune_allocator()  # payloads of a megabyte are reused, not mapped and faulted in each time

    from .._broker import Broker  # imported late so `zrpc --help` stays quick
    from .._broker._connections import ConnectionCapError, raise_fd_limit

    # A broker process holds one descriptor per connection: take what the hard limit allows;
    # Broker() then checks that both endpoints' caps fit in it (a cap that does not is a bad setting).
    before, limit = raise_fd_limit()
    for endpoint in (config.frontend, config.backend):
        _refuse_live_ipc(endpoint)
    try:
        broker_ = Broker(config, gate_handshakes=True)  # its own process: no GIL shared with clients
    except (ConnectionCapError, ValueError) as exc:  # a cap the fd limit cannot hold, a bad key file
        raise CliError(f"bad broker setting: {exc}", exit_code=EXIT_USAGE) from None
    if limit != before:
        log.info("file descriptor limit raised from %d to %d (max_connections %d per endpoint)",
                 before, limit, broker_.max_connections)
    try:
        frontend, backend = broker_.bind()
    except ValueError as exc:  # the keys are read when the authenticator starts, at bind
        raise CliError(f"bad broker setting: {exc}", exit_code=EXIT_USAGE) from None
    except Exception as exc:  # zmq.ZMQError: address in use, no such interface, bad path
        where = "" if "addr=" in str(exc) else f" (frontend={config.frontend}, backend={config.backend})"
        if _may_clash(config.frontend, config.backend):
            where += f"; the frontend and the backend both ask for port {endpoint_port(config.frontend)}"
        raise CliError(f"cannot bind broker: {exc}{where}") from None

    signals_seen = []

    def on_signal(signum, frame) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1 and config.drain_grace > 0:
            log.info("received %s; draining (a second signal stops at once)", signal.Signals(signum).name)
            broker_.drain(config.drain_grace)
        else:
            log.info("received %s; stopping", signal.Signals(signum).name)
            broker_.stop()

    def on_hangup(signum, frame) -> None:
        if broker_.security is None:  # SIGHUP's default action would kill the broker
            log.warning("received SIGHUP: this broker runs without CURVE, there are no keys to reload")
            return
        try:
            broker_.reload_keys()  # live connections of removed keys are refused from now on
        except (OSError, ValueError) as exc:
            log.error("reload on SIGHUP failed, keeping the previous keys: %s", exc)

    from .._broker._metrics import broker_registry

    try:  # until run(): a failure here (the metrics port taken, a SIGTERM) closes the bound broker
        metrics = start_metrics(lambda: broker_registry(broker_), metrics_host, metrics_port)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)
        # Always handled: `systemctl reload` (zrpc-broker.service) sends it to any broker.
        previous_hangup = signal.signal(signal.SIGHUP, on_hangup)
        ready_line(f"zrpc broker ready: frontend={frontend} backend={backend}"
                   + (f" metrics={metrics.url}" if metrics else ""))
    except BaseException:
        broker_.close()  # its ipc:// files too: a stale one looks like a broker to a client
        raise
    try:
        broker_.run()
    finally:
        # The broker has stopped: later SIGINT and SIGTERM are ignored until the process ends.
        # Their default action (which Python restores at exit for signals it handled, not for
        # ignored ones) would kill it with status -15 or -2: Ctrl-C twice, a repeated stop.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, previous_hangup)
        if metrics is not None:
            metrics.close()
    log.info("broker stopped")


# Settings of the process around the broker that a config file may hold too (a unit that
# starts `zrpc broker start --config FILE` has no other place for them).
_PROCESS_SETTINGS = {  # name -> is this value one the flag would take?
    "log_format": lambda v: v in ("text", "json"),
    "metrics_port": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535,
    "metrics_host": lambda v: isinstance(v, str) and bool(v),
}


def _read_config_file(config_file: str | None) -> tuple[dict, dict]:
    """The file's broker settings and its process settings (both empty without a file)."""
    if config_file is None:
        return {}, {}
    try:
        settings = load_config_file(config_file, extra=_PROCESS_SETTINGS)
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{config_file}: not valid TOML: {exc}", exit_code=EXIT_USAGE) from None
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(str(exc), exit_code=EXIT_USAGE) from None
    process = {name: settings.pop(name) for name in _PROCESS_SETTINGS if name in settings}
    return settings, process


def _process_settings(config_file: str | None, from_file: dict, **given) -> dict:
    """``given`` (the flags' values), except where a flag was left at its default and the file
    sets it: flags and ZRPC_ variables win over the file, the file over the defaults."""
    ctx = click.get_current_context()
    chosen = dict(given)
    for name, value in from_file.items():
        if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
            if not _PROCESS_SETTINGS[name](value):
                raise CliError(f"{config_file}: bad {name} {value!r}", exit_code=EXIT_USAGE)
            chosen[name] = value
    return chosen


def _build_config(config_file: str | None, from_file: dict, **flags) -> BrokerConfig:
    """Defaults, overridden by the file's settings, overridden by flags (None means the flag was
    not given). An error names the file when the setting at fault came from it."""
    try:
        config = BrokerConfig().replace(**from_file)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc), exit_code=EXIT_USAGE) from None
    config = config.replace(**flags)

    def bad(message: str, *settings: str) -> CliError:
        from_the_file = [name for name in settings if name in from_file and flags.get(name) is None]
        if from_the_file and len(from_the_file) == len(settings):
            message = f"{config_file}: {message}"
        elif from_the_file:
            message = f"{message} ({', '.join(from_the_file)} from {config_file})"
        return CliError(blamed(message, *settings), exit_code=EXIT_USAGE)

    if str(config.log_level).upper() not in LOG_LEVELS:
        raise bad(f"bad log_level {config.log_level!r}; use one of {', '.join(LOG_LEVELS)}", "log_level")
    for name in ("frontend", "backend"):
        try:
            setattr(config, name, check_endpoint(getattr(config, name), f"{name} endpoint"))
        except CliError as exc:
            raise bad(exc.format_message(), name) from None
    try:
        config.validate()
    except SettingError as exc:
        raise bad(f"bad broker setting: {exc}", *exc.settings) from None
    except (ValueError, TypeError) as exc:  # TypeError: a file value of the wrong type
        raise CliError(f"bad broker setting: {exc}", exit_code=EXIT_USAGE) from None
    return config


# Host spellings that bind where another of them would (every interface, or this host's loopback).
_WILDCARD_HOSTS = {"*", "0.0.0.0", "[::]", "[*]"}
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1"}


def _may_clash(frontend: str, backend: str) -> bool:
    """Do two tcp endpoints ask for one port of one address (or overlapping ones)?"""
    first, second = endpoint_host_port(frontend), endpoint_host_port(backend)
    if first is None or second is None or first[1] in ("0", "*") or first[1] != second[1]:
        return False
    hosts = [first[0], second[0]]
    if hosts[0] == hosts[1] or any(host in _WILDCARD_HOSTS for host in hosts):
        return True
    return all(host in _LOOPBACK_HOSTS for host in hosts)


def _refuse_live_ipc(endpoint: str) -> None:
    """Refuse an ipc:// path another process is serving on.

    libzmq unlinks an existing ipc socket file and binds anew, so a second broker would
    silently steal the path from a running one; tcp reports "Address already in use" itself.
    """
    found = ipc_socket_file(endpoint)  # None: not ipc://, the abstract namespace, or nothing there
    if found is None:
        return
    path, _ = found
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return  # a stale file from a process that died: binding over it is right
    finally:
        probe.close()
    raise CliError(f"cannot bind {endpoint}: Address already in use (another process serves it)")
