"""Fine-tuning from a Hugging Face GPT-2 directory: `train.py init_from=<hf dir>` starts at the
imported model's own loss (measured by transformers on the same validation tokens).

Needs train.py's init_from to read through engine.formats.pretrained.load_pretrained; until that wiring is
in, the test skips and says so."""

from pathlib import Path

import pytest
import torch
from conftest import compose_train

transformers = pytest.importorskip("transformers")

import train  # noqa: E402
from data.loader import val_batches  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.tokenizer import train_bpe  # noqa: E402

pytestmark = [pytest.mark.hf, pytest.mark.skipif(
    "load_pretrained" not in (Path(__file__).resolve().parents[1] / "train.py").read_text(),
    reason="train.py's init_from does not read through engine.formats.pretrained.load_pretrained yet")]


def test_finetune_from_hf_gpt2_starts_at_its_loss(tiny_overrides, corpus, tmp_path):
    bpe = train_bpe(iter([corpus.read_text()]), vocab_size=300)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=16, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=bpe.eot_id, eos_token_id=bpe.eot_id)
    reference = transformers.GPT2LMHeadModel(config).eval()
    hf_dir = tmp_path / "gpt2"
    reference.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(bpe.to_json())

    cfg = compose_train([*tiny_overrides, "data.tokenizer=pretrained", f"data.tokenizer_path={hf_dir}",
                         f"init_from={hf_dir}", "max_iters=0", "final_eval_iters=-1"])
    summary = train.train(cfg)

    prepared = prepare(cfg.data)  # a cache hit: the directory the run trained on
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for x, y in val_batches(prepared, "val", cfg.batch_size, 16, None):
            logits = reference(x).logits  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            sums += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64)
    assert summary["step"] == 0
    assert abs(summary["final_val"] - (sums[0] / sums[1]).item()) < 1e-4
