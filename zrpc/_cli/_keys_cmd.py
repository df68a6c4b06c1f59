"""``zrpc keys generate NAME``: a CURVE key pair in ZeroMQ's certificate format."""
from __future__ import annotations

import click

from ._common import EXIT_USAGE, CliError, option


@click.group()
def keys() -> None:
    """Make CURVE keys for brokers, clients and workers (README: Security)."""


@keys.command()
@click.argument("name")
@option("--dir", "directory", default=".", show_default=True, metavar="DIR", envvar="ZRPC_KEYS_GENERATE_DIR",
        type=click.Path(file_okay=False), help="Where to write the two files.")
def generate(name: str, directory: str) -> None:
    """Write NAME.key (public: give it to the peers) and NAME.key_secret (mode 0600: keep it).

    Copy a client's NAME.key into the broker's --client-keys directory and a worker's into its
    --worker-keys directory; give the broker's .key to clients and workers as --broker-key.
    Prints the two paths.
    """
    from .. import _security

    try:
        public, secret = _security.generate_keys(name, directory)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"cannot write keys in {directory}: {exc}") from None
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret}")
