"""An operator may name an object by a unique prefix of its id, as with git commits.

Ids are random hex, so four characters are almost always enough and copying them from a table
is the slow part. Shorter prefixes are never guessed: acting on the wrong device is worse than
asking for more characters. An exact id always wins over a longer id it happens to prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

from damm.errors import Code, DammError

MIN_PREFIX = 4
SHOWN = 5


def resolve_prefix(ids: Iterable[str], given: str, what: str) -> str:
    """The one id ``given`` names: itself, or the only id it prefixes."""
    known = ids if isinstance(ids, set | frozenset | dict) else set(ids)
    if given in known:
        return given
    if len(given) < MIN_PREFIX:
        raise DammError(
            Code.NOT_FOUND, f"{what} {given!r} (a prefix needs at least {MIN_PREFIX} characters)"
        )
    matches = sorted(i for i in known if i.startswith(given))
    if not matches:
        raise DammError(Code.NOT_FOUND, f"{what} {given!r}")
    if len(matches) > 1:
        more = f" and {len(matches) - SHOWN} more" if len(matches) > SHOWN else ""
        raise DammError(
            Code.AMBIGUOUS_ID,
            f"{what} {given!r} could be {', '.join(matches[:SHOWN])}{more}: give more characters",
        )
    return matches[0]
