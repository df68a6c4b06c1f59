"""The ``zrpc`` click group. Commands live in their own modules and are attached here."""
from __future__ import annotations

import click

from .. import __version__
from ._broker_cmd import broker
from ._call_cmd import call, health, services
from ._common import EXIT_CODES_HELP, ExitOnInterrupt
from ._keys_cmd import keys
from ._status_cmd import status
from ._worker_cmd import worker

CONTEXT_SETTINGS = {
    # Every option can also come from the environment: ZRPC_<COMMAND>_<OPTION>, from the option's
    # long name (an option whose parameter is named otherwise sets that envvar itself), e.g.
    # ZRPC_BROKER_START_FRONTEND; --broker of call/services/health/status reads ZRPC_BROKER.
    "auto_envvar_prefix": "ZRPC",
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
}


class _Group(ExitOnInterrupt, click.Group):
    """The zrpc group: Ctrl-C in any of its commands exits 130."""


@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="zrpc", message="%(prog)s %(version)s")
def main() -> None:
    """zrpc: typed protobuf RPC through a ZeroMQ broker.

    \b
    Start a broker, run workers, call any method from the shell:
      zrpc broker start
      zrpc worker run workers.greeter:Greeter
      zrpc call helloworld.Greeter/SayHello '{"name": "Ada"}'
      zrpc services

    Every option also reads an environment variable (shown in each command's --help).
    """


main.add_command(broker)
main.add_command(worker)
main.add_command(call)
main.add_command(services)
main.add_command(health)
main.add_command(keys)
main.add_command(status)


if __name__ == "__main__":
    main(prog_name="zrpc")
