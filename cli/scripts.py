"""key=value arguments and one-line errors for the scripts that do without Hydra
(scripts/export.py, scripts/export_hf.py).
"""

from __future__ import annotations

import sys
from typing import NoReturn

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def fail(message: str) -> NoReturn:
    """Print one `error: ...` line and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str], defaults: dict[str, str | bool | None], usage: str) -> dict:
    """key=value arguments against defaults (None = required); bools accept true/false."""
    args = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")  # tolerate Hydra's "+key=value" habit
        if not sep or key not in defaults:
            fail(f"unexpected argument {arg!r}; usage: {usage}")
        if isinstance(defaults[key], bool):
            if value.lower() not in TRUE + FALSE:
                fail(f"{key}={value!r} must be true or false")
            args[key] = value.lower() in TRUE
        else:
            args[key] = value
    if missing := [k for k, v in args.items() if v is None or v == ""]:
        fail(f"missing {', '.join(f'{k}=...' for k in missing)}; usage: {usage}")
    return args
