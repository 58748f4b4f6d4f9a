"""What every command shares: finding the stack, running async code, printing, failing cleanly."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncpg
import click
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from damm import private_files, settings
from damm.errors import Code, DammError
from damm.protocol.router import BUS_TROUBLE
from damm.stack.stackfile import StackFile

T = TypeVar("T")


@dataclass
class Target:
    nats_url: str | None
    database_url: str | None
    json: bool = False

    def stack(self) -> StackFile | None:
        stack = StackFile.read()
        if stack is not None and stack.stopped:
            raise DammError(
                Code.UNAVAILABLE, "the local stack is stopped (start it with `damm up`)"
            )
        return stack

    def _stack_quietly(self) -> StackFile | None:
        stack = StackFile.read()
        return None if stack is None or stack.stopped else stack

    def nats(self) -> str:
        if self.nats_url:
            return self.nats_url
        stack = self.stack()
        if stack is None:
            raise DammError(
                Code.UNAVAILABLE,
                "no --nats/DAMM_NATS_URL and no local stack (start one with `damm up`)",
            )
        return stack.nats_url

    def database(self) -> str:
        if self.database_url:
            return self.database_url
        stack = self.stack()
        if stack is None:
            raise DammError(
                Code.UNAVAILABLE,
                "no --database-url/DAMM_DATABASE_URL and no local stack (start one with `damm up`)",
            )
        return stack.database_url

    def credentials(self, role: str) -> tuple[str | None, str | None]:
        """Password from DAMM_<ROLE>_PASSWORD, else the local stack file, else none."""
        env = settings.role_password(role)
        if env:
            return role, env
        stack = self._stack_quietly()
        # The stack's passwords are only good for the stack's own server.
        if stack and role in stack.passwords and self.nats_url in (None, stack.nats_url):
            return role, stack.passwords[role]
        return None, None

    async def connect(self, role: str | None = None, identity_seed: bytes | None = None) -> NATS:
        from damm.protocol.bus import connect

        url = self.nats()
        user, password = self.credentials(role) if role else (None, None)
        try:
            return await connect(
                url,
                user=user,
                password=password,
                name=f"damm-cli-{role or 'device'}",
                reconnect=False,
                identity_seed=identity_seed,
            )
        except DammError:
            raise
        except Exception as exc:  # nats raises a zoo of types for an unreachable server
            raise DammError(
                Code.UNAVAILABLE, f"cannot reach NATS at {_redact(url)}: {exc}"
            ) from None


def _redact(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def target(ctx: click.Context) -> Target:
    obj = ctx.find_object(Target)
    assert obj is not None
    if ctx.params.get("as_json"):
        obj.json = True
    return obj


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--json on the command itself too, so `damm admin devices --json` works as scripts expect."""
    return click.option("--json", "as_json", is_flag=True, help="machine-readable output")(fn)


def infrastructure_error(exc: BaseException) -> DammError | None:
    """The catalogued answer to a server that failed underneath a command, or None for a bug.

    An operator should read "unavailable: postgres …" and retry, never a traceback.
    """
    if isinstance(exc, DammError):
        return exc
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return DammError(Code.UNAVAILABLE, f"postgres: {type(exc).__name__}: {exc}")
    if isinstance(exc, BUS_TROUBLE):
        return DammError(Code.UNAVAILABLE, f"nats: {type(exc).__name__}: {exc}")
    if isinstance(exc, nats.errors.Error | nats.js.errors.Error):
        return DammError(Code.UNAVAILABLE, f"nats: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError | TimeoutError):
        return DammError(Code.UNAVAILABLE, f"{type(exc).__name__}: {exc}")
    return None


def fail(err: DammError) -> NoReturn:
    """One line on stderr, the catalog's exit status."""
    click.echo(f"error: {err.line()}", err=True)
    sys.exit(err.code.exit_status)


def run(coro_fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async command body; turn a failure into one line on stderr and an exit code."""

    @wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return asyncio.run(coro_fn(*args, **kwargs))
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:
            err = infrastructure_error(exc)
            if err is None:
                raise
            fail(err)

    return wrapper


async def with_nats(
    t: Target,
    role: str | None,
    body: Callable[[NATS], Awaitable[T]],
    identity_seed: bytes | None = None,
) -> T:
    nc = await t.connect(role, identity_seed)
    try:
        return await body(nc)
    finally:
        await nc.close()


def emit(t: Target, value: Any, text: Callable[[], None]) -> None:
    """--json prints the structured value; otherwise the human rendering."""
    if t.json:
        click.echo(msgspec.json.encode(value, enc_hook=str).decode())
    else:
        text()


def fit_columns(columns: Sequence[str], cells: Sequence[Sequence[str]], width: int) -> list[int]:
    """Which columns fit ``width``: every ``*_id`` column whole, the others from the left.

    A column that does not fit whole may still wrap down to a few characters; past that it is
    left out. An id is never cut: a cut id cannot be copied into the next command.
    """
    natural = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    ids = [i for i, c in enumerate(columns) if c.endswith("_id")]
    kept = list(range(len(columns)))

    def needed(keep: list[int]) -> int:
        # rich's default box: one border per column plus one, and one space padding each side
        return sum(natural[i] if i in ids else min(natural[i], 8) for i in keep) + 3 * len(keep) + 1

    while needed(kept) > width and (others := [i for i in kept if i not in ids]):
        kept.remove(others[-1])
    return kept


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    console: Any = None,
) -> None:
    """A table for people; ``--json`` is the format for programs.

    In a terminal it fits the width without cutting ids; in a pipe nothing is wrapped or left
    out, whatever the width, so `grep` and `awk` see whole rows.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cells = [[_cell(v) for v in row] for row in rows]
    natural = sum(max([len(c), *(len(r[i]) for r in cells)]) + 3 for i, c in enumerate(columns))
    if console.is_terminal:
        kept = fit_columns(columns, cells, console.width)
    else:
        kept = list(range(len(columns)))
        console.width = max(console.width, natural + 1)
    left_out = [c for i, c in enumerate(columns) if i not in kept]
    caption = f"left out at this width: {', '.join(left_out)} (see --json)" if left_out else None
    tbl = Table(title=title, show_lines=False, caption=caption)
    for i in kept:
        ident = columns[i].endswith("_id")
        whole = max([len(columns[i]), *(len(r[i]) for r in cells)]) if ident else None
        tbl.add_column(columns[i], no_wrap=ident, min_width=whole, overflow="fold")
    for row in cells:
        tbl.add_row(*(row[i] for i in kept))
    console.print(tbl, crop=False)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    return str(value)


def token_options(envvar: str, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--token-file`` and the environment carry a secret; ``ps`` shows every argument.

    ``--token`` still works for scripts written before, but is hidden from help: the README
    never shows a secret on a command line.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option(
            "--token-file",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help=f"File holding the {what} (mode 0600), or set {envvar}.",
        )(fn)
        return click.option(
            "--token",
            envvar=envvar,
            default=None,
            hidden=True,
            help=f"The {what} itself; shown by ps to every user, so prefer --token-file.",
        )(fn)

    return decorate


def resolve_token(token: str | None, token_file: Path | None, envvar: str, what: str) -> str:
    if token_file is not None:
        return private_files.read_secret(token_file, what)
    if token:
        return token
    raise DammError(Code.USAGE, f"no {what}: give --token-file FILE or set {envvar}")
