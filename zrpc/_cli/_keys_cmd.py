"""``zrpc keys generate NAME``: a CURVE key pair in ZeroMQ's certificate format."""
from __future__ import annotations

import pathlib

import click

from ._common import EXIT_CODES_HELP, EXIT_USAGE, CliError, option


@click.group(short_help="Make CURVE keys for brokers, clients and workers.")
def keys() -> None:
    """Make CURVE keys for brokers, clients and workers (README: Security)."""


@keys.command(epilog=EXIT_CODES_HELP)
@click.argument("name")
@option("--dir", "directory", default=".", show_default=True, metavar="DIR", envvar="ZRPC_KEYS_GENERATE_DIR",
        type=click.Path(file_okay=False), help="Where to write the two files.")
@option("--force", is_flag=True, default=False,
        help="Replace an existing NAME.key / NAME.key_secret (peers holding the old key are refused).")
def generate(name: str, directory: str, force: bool) -> None:
    """Write NAME.key (public: give it to the peers) and NAME.key_secret (mode 0600: keep it).

    Copy a client's NAME.key into the broker's --client-keys directory and a worker's into its
    --worker-keys directory; give the broker's .key to clients and workers as --broker-key.
    Prints the two paths. Refuses to replace an existing pair unless --force is given.
    """
    from .. import _security

    folder = pathlib.Path(directory)
    existing = [path for path in (folder / f"{name}.key", folder / f"{name}.key_secret") if path.exists()]
    if existing and not force:
        # A new pair would silently lock out every peer that holds the old public key.
        raise CliError(f"{' and '.join(map(str, existing))} already exist; pass --force to replace "
                       f"them (peers holding the old key will be refused)", exit_code=EXIT_USAGE)
    try:
        public, secret = _security.generate_keys(name, directory)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"cannot write keys in {directory}: {exc}") from None
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret}")
