"""The `damm` command."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from damm import log, settings
from damm.cli.common import Target, fail
from damm.errors import Code, DammError

# Each group is imported when it runs: `damm admin report` does not pay for the control plane,
# the orchestrator and the stack (about half the start-up of a one-shot command).
GROUPS = {
    "up": "damm.cli.up",
    "admin": "damm.cli.admin",
    "device": "damm.cli.device",
    "control": "damm.cli.control",
    "gateway": "damm.cli.gateway",
    "orchestrate": "damm.cli.orchestrate",
}


class DammGroup(click.Group):
    """Click's own usage errors in the catalog's one-line format and exit status; subcommand
    groups loaded on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *GROUPS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in GROUPS:
            command = getattr(importlib.import_module(GROUPS[cmd_name]), cmd_name)
            assert isinstance(command, click.Command)
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

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


if __name__ == "__main__":
    cli()
