"""What every zrpc command shares: option style, endpoint checks, one-line errors, exit codes."""
from __future__ import annotations

import difflib
import functools
import math
import os
import re
import signal
import sys
import threading
from typing import Iterable

import click

from .._endpoints import endpoint_problem
from .._errors import Error
from .._status import StatusCode


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: nan passes every comparison, and a
    tester's `-t nan` came back as "cannot connect" (exit 1) instead of a usage error."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"

# Exit statuses, the same for every command (also written in `zrpc --help`).
EXIT_OK = 0
EXIT_ERROR = 1  # a problem that is not a call's status: bad file, import failure, bind failure
EXIT_USAGE = 2  # bad flag or argument, JSON that does not parse (click uses 2 for usage too)
EXIT_NOT_SERVING = 4  # `zrpc health`: the service or broker does not serve
EXIT_STATUS_BASE = 10  # a call failed with status code C: exit 10 + C (NOT_FOUND 15, UNAVAILABLE 24)

EXIT_CODES_HELP = (
    "Exit status: 0 success; 1 error (file, import, bind); 2 usage or bad JSON; "
    "4 `health` not serving; 10+code when a call fails with a status code "
    "(DEADLINE_EXCEEDED 14, NOT_FOUND 15, RESOURCE_EXHAUSTED 18, UNIMPLEMENTED 22, UNAVAILABLE 24); "
    "130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command Ctrl-C ended
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, as Ctrl-C is: a call waited for is cancelled at
    its broker (a tester's `timeout 5 zrpc call ...` left the call running at its worker)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class ExitOnInterrupt:
    """For a click command or group (as its first base): Ctrl-C exits 130, the shells'
    convention for SIGINT (click says "Aborted!" and exits 1, which zrpc's table gives to file,
    import and bind errors), and SIGTERM exits 143 the same way. Commands that handle SIGTERM
    themselves (broker start, worker run) install their own handler over this one."""

    def invoke(self, ctx: click.Context):
        previous = None
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return super().invoke(ctx)
        except Terminated:
            click.echo("terminated", err=True)
            ctx.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        finally:
            # Only ours: `zrpc broker start` ignores SIGTERM once stopped, until the process ends.
            if previous is not None and signal.getsignal(signal.SIGTERM) is _raise_terminated:
                signal.signal(signal.SIGTERM, previous)


class _Option(click.Option):
    """An option whose bad value, when it came from an environment variable, is blamed on that
    variable: click's own message names the flag, which the user never typed."""

    def process_value(self, ctx: click.Context, value):
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as exc:
            if ctx.get_parameter_source(self.name) is not click.core.ParameterSource.ENVIRONMENT:
                raise
            variable = _variable_set(self, ctx)
            if variable is None:
                raise
            raise click.BadParameter(exc.message, ctx=ctx, param=self,
                                     param_hint=f"environment variable {variable}") from None


def _variables_of(option: click.Parameter, ctx: click.Context) -> list[str]:
    """The environment variables ``option`` reads: its own, then the automatic one (click reads
    that for options only: a tester was pointed to ZRPC_CALL_TARGET, which no one reads)."""
    names = [option.envvar] if isinstance(option.envvar, str) else list(option.envvar or ())
    if isinstance(option, click.Option) and ctx.auto_envvar_prefix is not None and option.name is not None:
        names.append(f"{ctx.auto_envvar_prefix}_{option.name.upper()}")
    return names


def _variable_set(option: click.Parameter, ctx: click.Context) -> str | None:
    """The variable ``option``'s value was read from."""
    return next((name for name in _variables_of(option, ctx) if os.environ.get(name)), None)


def variables_not_read(ctx: click.Context) -> list[str]:
    """Variables named with the command's prefix (ZRPC_BROKER_START_...) that none of its
    options reads: a typo, or a setting only a config file holds. Click ignores them silently."""
    if ctx.auto_envvar_prefix is None:
        return []
    read = {name for param in ctx.command.params for name in _variables_of(param, ctx)}
    prefix = f"{ctx.auto_envvar_prefix}_"
    return sorted(name for name in os.environ if name.startswith(prefix) and name not in read)


def warn_unread_variables() -> None:
    """Say on stderr which ZRPC_<COMMAND>_* variables the running command does not read (a
    tester's ZRPC_CALL_TIMEUOT=1 was ignored without a word; the broker already said so)."""
    ctx = click.get_current_context()
    unread = variables_not_read(ctx)
    if not unread:
        return
    # Suggested from the variables --help shows: an option with its own (ZRPC_BROKER) reads the
    # automatic one too (ZRPC_CALL_BROKERS), but a tester was pointed to that undocumented name.
    # Compared without their prefixes, so ZRPC_CALL_BROKR finds ZRPC_BROKER, not ZRPC_CALL_BROKER_KEY.
    documented = {names[0] for param in ctx.command.params if (names := _variables_of(param, ctx))}
    prefix = f"{ctx.auto_envvar_prefix}_"

    def setting(name: str) -> str:
        return name[len(prefix):] if name.startswith(prefix) else name.removeprefix("ZRPC_")

    by_setting = {setting(name): name for name in sorted(documented)}
    for variable in unread:
        close = difflib.get_close_matches(setting(variable), list(by_setting), n=1)
        click.echo(f"warning: {variable} is not read by `{ctx.command_path}` and is ignored"
                   + (f" (did you mean {by_setting[close[0]]}?)" if close else ""), err=True)


def blamed(message: str, *names: str) -> str:
    """``message``, saying which environment variable(s) the command's parameters ``names``
    were read from, for those that were (values checked in the command, not by click)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return message
    variables = [variable for param in ctx.command.params if param.name in names
                 and ctx.get_parameter_source(param.name) is click.core.ParameterSource.ENVIRONMENT
                 and (variable := _variable_set(param, ctx)) is not None]
    if not variables:
        return message
    return f"{message} (from environment variable{'s' if len(variables) > 1 else ''} {', '.join(variables)})"


# Every option shows its default and the environment variable it also reads.
option = functools.partial(click.option, show_envvar=True, cls=_Option)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# ZeroMQ transports a peer can connect or bind to; anything else fails deep inside libzmq.


class CliError(click.ClickException):
    """A user-facing failure: printed as one line ``error: ...`` on stderr, with an exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(" ".join(message.split()))  # one line, even for multi-line library errors
        self.exit_code = exit_code

    def show(self, file=None) -> None:  # click's hook; lower-case "error:" like grpcurl and git
        click.echo(f"error: {self.format_message()}", file=file, err=True)


# _client._core.SILENT_DETAIL and _protocol.UNSERVED_DETAIL, spelt here so that `zrpc --help`
# need not import the client.
_SILENT_DETAIL = "zrpc-broker-silent"
_UNSERVED_DETAIL = "zrpc-no-live-worker"


class CallFailed(CliError):
    """A failed call: the one ``error:`` line, then one ``  key: value`` line per detail."""

    def __init__(self, message: str, exit_code: int, details: dict):
        super().__init__(message, exit_code=exit_code)
        self.details = dict(details)

    def show(self, file=None) -> None:
        super().show(file)
        for key, value in sorted(self.details.items()):
            if key in ("zrpc-endpoint", _SILENT_DETAIL, _UNSERVED_DETAIL):  # the error line says these already
                continue
            # One line each, whatever the handler put in them.
            click.echo(f"  {key}: {' '.join(str(value).split())}", file=file, err=True)


def call_failed(error: Error, prefix: str = "") -> CallFailed:
    """The CliError for a call that failed with a status code: exit status 10 + code."""
    message = f"{error.code.name}: {error.message}" if error.message else error.code.name
    # The client's deadline message speaks to Python callers; here the setting is a flag.
    message = message.replace("pass a larger timeout=", "pass a larger --timeout")
    message = message.replace("in the client (max_message_bytes=)", "in the client (--max-message-bytes)")
    if (error.code == StatusCode.DEADLINE_EXCEEDED and "--timeout" not in message
            and _SILENT_DETAIL not in error.details and _UNSERVED_DETAIL not in error.details):
        # The broker's or the worker's own words (whichever deadline fired first): the same hint.
        message += "; pass a larger --timeout if the call is slow"
    return CallFailed(prefix + message, EXIT_STATUS_BASE + int(error.code), error.details)


def check_endpoint(endpoint: str, what: str = "endpoint", connect: bool = False) -> str:
    """Return ``endpoint`` stripped, or raise a one-line error naming what is wrong with it
    (``connect``: it is to connect to, not to bind)."""
    endpoint = str(endpoint).strip()
    problem = endpoint_problem(endpoint, connect)
    if problem:
        raise CliError(f"bad {what} {endpoint!r}: {problem}", exit_code=EXIT_USAGE)
    return endpoint


def split_endpoints(values: Iterable[str], what: str = "broker endpoint", param: str = "brokers") -> list[str]:
    """Flatten repeated and comma- or space-separated endpoint options (brokers to connect to)
    into a checked list; an error names the environment variable they came from, if one did."""
    endpoints: list[str] = []
    for value in values:
        for part in re.split(r"[,\s]+", value):
            if part:
                try:
                    endpoints.append(check_endpoint(part, what, connect=True))
                except CliError as error:
                    raise CliError(blamed(error.message, param), exit_code=error.exit_code) from None
    if not endpoints:
        raise CliError(f"no {what} given", exit_code=EXIT_USAGE)
    return endpoints


def curve_options(command):
    """``--curve-secret`` and ``--broker-key`` for a command that connects to brokers.

    Kept in the click context (``curve_settings()`` reads them) so commands pass them on
    without a parameter each.
    """
    def remember(ctx: click.Context, param: click.Parameter, value):
        # Read now: a file that holds no key is a bad value, exit 2 as for a missing file (a
        # tester's got "error: cannot connect to ...: cannot read CURVE key", exit 1).
        if value is not None:
            from .._security import check_key_files

            try:
                suspect = check_key_files(value if param.name == "curve_secret" else None,
                                          value if param.name == "broker_key" else None)
            except ValueError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
            for warning in suspect:  # a tester handed the broker's secret file to a client
                click.echo(f"warning: {warning}", err=True)
        ctx.meta[f"zrpc.{param.name}"] = value
        return value

    command = option("--broker-key", metavar="FILE|KEY", expose_value=False, callback=remember,
                     help="The broker's public key (its NAME.key file, or the 40-character z85 "
                          "key); turns on CURVE with --curve-secret.")(command)
    return option("--curve-secret", metavar="FILE", expose_value=False, callback=remember,
                  type=click.Path(exists=True, dir_okay=False),
                  help="Our NAME.key_secret (from `zrpc keys generate`); turns on CURVE.")(command)


def curve_settings() -> dict:
    """``curve_secret`` and ``broker_key`` given to the running command (None when not given)."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    settings = {"curve_secret": meta.get("zrpc.curve_secret"), "broker_key": meta.get("zrpc.broker_key")}
    if (settings["curve_secret"] is None) != (settings["broker_key"] is None):
        raise CliError("CURVE needs both --curve-secret and --broker-key", exit_code=EXIT_USAGE)
    return settings


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr (stdout is for results): text lines, or one JSON object per line."""
    from .._logging import setup_logging as setup

    setup(level, log_format, sys.stderr)


# --log-format, --metrics-port and --metrics-host read the same on `broker start` and `worker run`.
log_format_option = option(
    "--log-format", type=click.Choice(("text", "json")), default="text", show_default=True,
    help="Log lines as text, or as one JSON object each (ts, level, logger, msg, trace_id, ...).")
metrics_port_option = option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port) [default: off].")
metrics_host_option = option(
    "--metrics-host", default="127.0.0.1", show_default=True, metavar="HOST",
    help="Address the metrics endpoint listens on.")


def start_metrics(registry_factory, host: str, port: int | None):
    """The running metrics server, or None when --metrics-port was not given."""
    if port is None:
        return None
    from .._metrics import serve_metrics

    try:
        return serve_metrics(registry_factory(), host, port)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {host}:{port}: {exc}") from None


def ready_line(text: str) -> None:
    """Print the one line scripts and tests wait on, and make sure it leaves the process now."""
    click.echo(text)
    sys.stdout.flush()
