"""Export a trained model as a Hugging Face GPT-2 directory that transformers loads as is.

    python scripts/export_hf.py ckpt=outputs/2024-01-01/12-00-00 out=exports/my-gpt2-hf
    # then: GPT2LMHeadModel.from_pretrained(out), AutoTokenizer.from_pretrained(out)

Writes config.json, generation_config.json, model.safetensors and, with a tokenizer, tokenizer.json +
tokenizer_config.json. Only models GPT-2 can express export (pre-LN, learned positions, tied weights,
biases, causal); any other is refused naming the setting (scripts/export.py exports every model).
verify=true (default) reloads it with transformers and compares logits on random tokens (fp32, CPU):
above 1e-4, exit 1. Needs pip install -e '.[hf]'. A bad input prints one `error: ...` line, exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's packages

from cli import fail, parse_args  # noqa: E402

TOLERANCE = 1e-4


def verify(ckpt: dict, out: Path) -> float:
    """Max |logit difference| between our model and transformers' reload of out, on random tokens."""
    import torch
    import transformers

    from engine.checkpoint import model_from_checkpoint
    ours = model_from_checkpoint(ckpt, "cpu").eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    cfg, g = ours.config, torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (2, min(cfg.block_size, 32)), generator=g)  # (B, T)
    with torch.no_grad():
        return (ours(idx)[0] - theirs(idx).logits).abs().max().item()


def main(argv: list[str]) -> None:
    usage = "python scripts/export_hf.py ckpt=<checkpoint, run dir or export> out=<dir> [overwrite=true] [verify=false]"
    args = parse_args(argv, {"ckpt": None, "out": None, "overwrite": False, "verify": True}, usage)
    from engine.formats.hf import check_gpt2_expressible, require_transformers, save_hf
    from engine.formats.pretrained import load_pretrained, prepare_out_dir, write_dir
    try:
        out = prepare_out_dir(args["out"], args["overwrite"])
        ckpt = load_pretrained(args["ckpt"])
        check_gpt2_expressible(ckpt["model_config"])  # refuse before the slow transformers import
        require_transformers()
        files = write_dir(out, lambda tmp: save_hf(ckpt, tmp))
    except (ImportError, ValueError) as e:  # CheckpointError is a ValueError
        fail(str(e))
    print(f"exported {ckpt['source']} {args['ckpt']} to {out}: {', '.join(files)}")
    if "tokenizer.json" not in files:
        print("note: the model has no tokenizer, so the directory has none; AutoTokenizer will not load it")
    if args["verify"]:
        diff = verify(ckpt, out)
        if diff > TOLERANCE:
            print(f"error: transformers' logits differ from ours by {diff:.2e} (> {TOLERANCE}); please report "
                  "this as a bug", file=sys.stderr)
            raise SystemExit(1)
        print(f"verified: transformers reloads it; max |logit difference| vs ours = {diff:.2e} (fp32, CPU)")
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
