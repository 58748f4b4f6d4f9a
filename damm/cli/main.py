"""The `damm` command."""

from __future__ import annotations

import sys
from typing import Any

import click

from damm import log, settings
from damm.cli.admin import admin
from damm.cli.common import Target, fail
from damm.cli.control import control
from damm.cli.device import device
from damm.cli.gateway import gateway
from damm.cli.orchestrate import orchestrate
from damm.cli.up import up
from damm.errors import Code, DammError


class DammGroup(click.Group):
    """Click's own usage errors in the catalog's one-line format and exit status."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            fail(DammError(Code.USAGE, f"{exc.format_message()}{hint}"))
        except click.ClickException as exc:
            fail(DammError(Code.INVALID_ARGUMENT, exc.format_message()))
        except click.Abort:
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=DammGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats", "nats_url", envvar="DAMM_NATS_URL", help="NATS URL (default: local stack)")
@click.option(
    "--database-url", envvar="DAMM_DATABASE_URL", help="Postgres URL (default: local stack)"
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--log-level",
    envvar="DAMM_LOG_LEVEL",
    default="warning",
    show_default=True,
    help="debug, info, warning or error (logs go to stderr)",
)
@click.pass_context
def cli(
    ctx: click.Context,
    nats_url: str | None,
    database_url: str | None,
    as_json: bool,
    log_level: str,
) -> None:
    """DAMM: a WireGuard VPN control plane on an event log."""
    log.configure(log_level, json=settings.log_json())
    ctx.obj = Target(nats_url, database_url, as_json)


cli.add_command(up)
cli.add_command(admin)
cli.add_command(device)
cli.add_command(control)
cli.add_command(gateway)
cli.add_command(orchestrate)

if __name__ == "__main__":
    cli()
