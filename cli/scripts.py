"""For the code that runs without Hydra (scripts/, tests): key=value arguments with one-line errors,
and `model_preset(name)`, a named size read from configs/model/<name>.yaml, where each is written down.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


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


def model_preset(name: str) -> dict:
    """The fields of configs/model/<name>.yaml (all of ModelConfig's), for ModelConfig(**fields).
    An unknown name is a one-line ValueError that lists the valid ones."""
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml"))
    if name not in names:  # also keeps a name such as ../train from reading another file
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(names)} (configs/model/)")
    fields = OmegaConf.to_container(OmegaConf.load(MODEL_CONFIGS / f"{name}.yaml"), resolve=True)
    fields.pop("defaults", None)  # Hydra's: the schema the file is checked against
    return fields
