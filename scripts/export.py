"""Export a trained model as our pickle-free artifact: model.safetensors + config.json + tokenizer.json.

    python scripts/export.py ckpt=outputs/2024-01-01/12-00-00 out=exports/shakespeare [overwrite=true]

ckpt is anything `engine.formats.pretrained.load_pretrained` reads. The result loads, running no
pickle, with `engine.formats.from_pretrained(out)`, `sample.py ckpt=out` and `train.py init_from=out`.
Arguments are key=value, like Hydra overrides; a bad input prints one `error: ...` line, exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python scripts/export.py` the script's own folder is on sys.path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import fail, parse_args  # noqa: E402


def main(argv: list[str]) -> None:
    usage = "python scripts/export.py ckpt=<checkpoint, run dir, export or HF GPT-2 dir> out=<dir> [overwrite=true]"
    args = parse_args(argv, {"ckpt": None, "out": None, "overwrite": False}, usage)
    from engine.formats.pretrained import load_pretrained, prepare_out_dir, save_export, write_dir
    try:
        out = prepare_out_dir(args["out"], args["overwrite"])
        ckpt = load_pretrained(args["ckpt"])
        files = write_dir(out, lambda tmp: save_export(ckpt, tmp))
    except ValueError as e:  # CheckpointError too
        fail(str(e))
    n_params = sum({t.data_ptr(): t.numel() for t in ckpt["model"].values()}.values())  # tied counted once
    print(f"exported {ckpt['source']} {args['ckpt']} ({n_params / 1e6:.2f}M parameters) to {out}: "
          f"{', '.join(files)}")
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
