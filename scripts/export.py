"""Export a trained model as our pickle-free artifact: model.safetensors + config.json + tokenizer.json.

    python scripts/export.py ckpt=outputs/2024-01-01/12-00-00 out=exports/shakespeare
    python scripts/export.py ckpt=exports/shakespeare/../gpt2-hf out=exports/gpt2 overwrite=true

ckpt is anything `model.pretrained.load_pretrained` reads (a checkpoint, a run directory, an export,
a Hugging Face GPT-2 directory). The result loads with `GPT.from_pretrained(out)`, `sample.py
ckpt=out`, and `train.py init_from=out`, and loading it runs no pickle: it is what we recommend sharing.

Arguments are key=value, like Hydra overrides. A bad input prints one `error: ...` line and exits 2.
The helpers `parse_args` and `fail` are shared with scripts/export_hf.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

# Run as `python scripts/export.py` the script's own folder is on sys.path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def fail(message: str) -> NoReturn:
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
    missing = [k for k, v in args.items() if v is None or v == ""]
    if missing:
        fail(f"missing {', '.join(f'{k}=...' for k in missing)}; usage: {usage}")
    return args


def main(argv: list[str]) -> None:
    usage = "python scripts/export.py ckpt=<checkpoint, run dir, export or HF GPT-2 dir> out=<dir> [overwrite=true]"
    args = parse_args(argv, {"ckpt": None, "out": None, "overwrite": False}, usage)
    from model.checkpoint import CheckpointError
    from model.pretrained import load_pretrained, prepare_out_dir, save_export, write_dir
    try:
        out = prepare_out_dir(args["out"], args["overwrite"])
        ckpt = load_pretrained(args["ckpt"])
        files = write_dir(out, lambda tmp: save_export(ckpt, tmp))
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    n_params = sum({t.data_ptr(): t.numel() for t in ckpt["model"].values()}.values())  # tied counted once
    print(f"exported {ckpt['source']} {args['ckpt']} ({n_params / 1e6:.2f}M parameters) to {out}: "
          f"{', '.join(files)}")
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
