"""Fine-tuning from a Hugging Face GPT-2 directory: `train.py init_from=<hf dir>` starts at the
imported model's own loss (measured by transformers on the same validation tokens).

A hub name (init_from=gpt2) is downloaded when online, one line when not; eval_only=true (nanoGPT's
name) evaluates such weights without training."""

import pytest
import torch
from conftest import compose_train

transformers = pytest.importorskip("transformers")

import train  # noqa: E402
from data.loader import val_batches  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.tokenizer import train_bpe  # noqa: E402

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("by_name", [False, True])
def test_finetune_from_hf_gpt2_starts_at_its_loss(tiny_overrides, corpus, tmp_path, monkeypatch, by_name):
    """From a directory, or by hub name (init_from=gpt2: downloaded into the Hugging Face cache, here
    a stand-in for the download) with nanoGPT's eval_only=true."""
    bpe = train_bpe(iter([corpus.read_text()]), vocab_size=300)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=16, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=bpe.eot_id, eos_token_id=bpe.eot_id)
    reference = transformers.GPT2LMHeadModel(config).eval()
    hf_dir = tmp_path / "gpt2"
    reference.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(bpe.to_json())

    asked = []
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or str(hf_dir))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no ./gpt2 here: a hub name
    start = ["init_from=gpt2", "eval_only=true"] if by_name else [f"init_from={hf_dir}", "max_iters=0"]
    cfg = compose_train([*tiny_overrides, "data.tokenizer=pretrained", f"data.tokenizer_path={hf_dir}",
                         *start, "final_eval_iters=-1"])
    summary = train.train(cfg)

    prepared = prepare(cfg.data)  # a cache hit: the directory the run trained on
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for x, y in val_batches(prepared, "val", cfg.batch_size, 16, None):
            logits = reference(x).logits  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            sums += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64)
    assert summary["step"] == 0 and asked == (["gpt2"] if by_name else [])
    assert abs(summary["final_val"] - (sums[0] / sums[1]).item()) < 1e-4


def test_a_hub_name_offline_is_one_line_and_eval_only_needs_weights(tiny_overrides, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^gpt2 is no local file or directory, and the Hugging Face hub could "
                                         r"not give model 'gpt2' \(We couldn't connect.*huggingface-cli download gpt2"):
        train.train(compose_train([*tiny_overrides, "init_from=gpt2", "max_iters=0"]))
    with pytest.raises(ValueError, match=r"eval_only=true evaluates a trained model: give init_from="):
        compose_train([*tiny_overrides, "eval_only=true"])
