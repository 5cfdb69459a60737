"""sample.py's generation mode, on a checkpoint trained for a few steps in tmp_path: determinism,
greedy and top-k, streaming, the KV cache, and every bad input (each a one-line error or warning).

The configs are composed with Hydra's compose API from the real configs/sample.yaml, then run by
sample.run(); two subprocess checks cover the command line end to end (exit status, one-line error).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cli
import sample
from causality.sampling import encode_prompt, stream_sample
from data.config import DataError
from data.tokenizer import CharTokenizer, train_bpe
from engine.checkpoint import CheckpointError, save_checkpoint
from model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 8


pytestmark = pytest.mark.usefixtures("one_thread")


def train_checkpoint(path: Path, steps: int = 100) -> Path:
    """A char-level GPT trained for a few AdamW steps on TEXT, saved as the trainer saves it."""
    tok = CharTokenizer.from_text([TEXT])
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    data = torch.tensor(tok.encode(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # enough for greedy text that is not one repeated letter
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        x = torch.stack([data[s:s + 32] for s in starts])  # (8, 32)
        y = torch.stack([data[s + 1:s + 33] for s in starts])  # (8, 32)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(path, {"model": model.state_dict(), "model_config": cfg.to_dict(),
                                  "tokenizer": tok.to_json(), "config": {}, "step": steps})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread) -> Path:
    return train_checkpoint(tmp_path_factory.mktemp("run") / "last.pt")


def compose_cfg(*overrides: str) -> sample.SampleConfig:
    sample.register_configs()
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("sample", overrides=list(overrides)))


def run_sample(*overrides: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = sample.run(compose_cfg("device=cpu", *overrides), io.StringIO(stdin), out, err)
    return code, out.getvalue(), err.getvalue()


def gen(ckpt: Path, *overrides: str, **kw) -> str:
    code, out, _ = run_sample(f"ckpt={ckpt}", "max_new_tokens=40", *overrides, **kw)
    assert code == 0
    return out


# ---- generation ---------------------------------------------------------------------------------
def test_same_seed_same_text_and_another_seed_other_text(ckpt):
    a = gen(ckpt, "prompt=First", "seed=1", "temperature=1.0")
    assert a == gen(ckpt, "prompt=First", "seed=1", "temperature=1.0")
    assert a != gen(ckpt, "prompt=First", "seed=2", "temperature=1.0")
    assert a.startswith("First") and len(a) > len("First") + 20


def test_top_k_1_equals_greedy(ckpt):
    greedy = gen(ckpt, "prompt=Speak", "temperature=0")
    assert gen(ckpt, "prompt=Speak", "temperature=1.5", "top_k=1", "seed=7") == greedy


def test_cache_on_and_off_give_the_same_text(ckpt):
    # 40 new tokens after a 20-token prompt run past block_size=32: the cropped re-prefill path too.
    prompt = "prompt=Before we proceed any"
    greedy = gen(ckpt, prompt, "temperature=0", "use_cache=true")
    assert greedy == gen(ckpt, prompt, "temperature=0", "use_cache=false")
    assert len(set(greedy[len("Before we proceed any"):])) > 5  # varied text: a real comparison
    # Sampling with one seed draws the same random numbers either way, so equal logits give equal text.
    sampled = gen(ckpt, prompt, "temperature=1", "seed=11", "use_cache=true")
    assert sampled == gen(ckpt, prompt, "temperature=1", "seed=11", "use_cache=false") != greedy


def test_streamed_pieces_equal_the_returned_text(ckpt):
    code, out, err = run_sample(f"ckpt={ckpt}", "prompt=All:", "max_new_tokens=30", "num_samples=2")
    assert code == 0
    first, second = out.rstrip("\n").split("\n---------------\n")
    assert first.startswith("All:") and second.startswith("All:")
    assert "tokens/s" in err and "tokens/s" not in out  # stdout holds only the text
    assert "60 tokens in" in err


def test_stream_sample_bpe_never_prints_broken_utf8(monkeypatch):
    # A byte-level BPE with almost no merges spells 東 and 京 as three byte tokens each, every one of
    # which decodes alone to U+FFFD. Feed that id sequence through stream_sample as if the model
    # had generated it: each printed piece must be whole characters, and the pieces must join to the text.
    text = "東京 naïve café — déjà vu"
    tok = train_bpe(iter([text * 20]), vocab_size=258)
    ids = tok.encode(text)
    assert sum(tok.decode([i]) == "\ufffd" for i in ids) >= 6  # the test is not vacuous

    def scripted(model, idx, n, **kw):
        yield from (torch.tensor([[i]]) for i in ids[:n])
    monkeypatch.setattr("causality.sampling.generate_tokens", scripted)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    pieces: list[str] = []
    s = stream_sample(model, tok, [ids[0]], max_new_tokens=len(ids), write=pieces.append)
    assert s.new_ids == ids
    assert "".join(pieces) == s.streamed == s.text == text
    assert all("\ufffd" not in p for p in pieces)
    assert "東" in pieces[0] and len(pieces) < len(ids)  # pieces were held back until complete


def test_prompt_from_stdin_and_from_file(ckpt, tmp_path):
    greedy = gen(ckpt, "prompt=Speak", "temperature=0")
    assert gen(ckpt, "prompt=-", "temperature=0", stdin="Speak") == greedy
    (tmp_path / "p.txt").write_text("Speak", encoding="utf-8")
    assert gen(ckpt, f"prompt_file={tmp_path / 'p.txt'}", "temperature=0") == greedy


def test_ckpt_defaults_to_the_newest_run_under_outputs_and_multirun(ckpt, tmp_path):
    old = train_checkpoint(tmp_path / "outputs" / "2026-01-01" / "10-00-00" / "last.pt", steps=1)
    new = tmp_path / "outputs" / "2026-01-02" / "10-00-00" / "last.pt"
    new.parent.mkdir(parents=True)
    new.write_bytes(ckpt.read_bytes())
    os.utime(old, (1, 1))  # the older run, whatever the directory names say
    from_new, from_old = gen(new, "prompt=All", "temperature=1"), gen(old, "prompt=All", "temperature=1")
    assert from_new != from_old  # the two runs are told apart by their text
    code, out, err = run_sample(f"outputs_dir={tmp_path / 'outputs'}", "prompt=All", "temperature=1",
                                "max_new_tokens=40")
    assert code == 0 and out == from_new
    swept = tmp_path / "multirun" / "2026-01-03" / "10-00-00" / "1" / "best.pt"  # a sweep's job, newer still
    swept.parent.mkdir(parents=True)
    swept.write_bytes(old.read_bytes())
    code, out, err = run_sample(f"outputs_dir={tmp_path / 'outputs'}", "prompt=All", "temperature=1",
                                "max_new_tokens=40")
    assert code == 0 and out == from_old  # the sweep job's weights


def test_a_run_dir_of_step_files_only_samples_its_newest_and_a_bad_vocabulary_is_one_line(ckpt, tmp_path):
    run = tmp_path / "steps_only"
    run.mkdir()
    (run / "ckpt-000100.pt").write_bytes(ckpt.read_bytes())
    train_checkpoint(run / "ckpt-000001.pt", steps=1)
    assert gen(run, "prompt=All", "temperature=1") == gen(ckpt, "prompt=All", "temperature=1")
    payload = torch.load(ckpt, weights_only=True)
    tok = json.loads(payload["tokenizer"])
    tok["chars"] = "".join(sorted(set(tok["chars"]) | set("0123456789"))) # 10 more ids than the embedding
    save_checkpoint(tmp_path / "wide.pt", {**payload, "tokenizer": json.dumps(tok)})
    with pytest.raises(CheckpointError, match=r"does not fit this data: this data has \d+ token ids, its embedding only"):
        run_sample(f"ckpt={tmp_path / 'wide.pt'}")


# ---- bad input: one clear error or warning each ----------------------------------------------
def test_no_checkpoint_anywhere_says_how_to_train_one(tmp_path):
    with pytest.raises(CheckpointError, match=r"python train\.py"):
        run_sample(f"outputs_dir={tmp_path}")


def test_missing_corrupt_and_wrong_version_checkpoints(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run_sample(f"ckpt={tmp_path / 'nope.pt'}")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=r"corrupt.*corrupt\.pt|corrupt\.pt.*corrupt"):
        run_sample(f"ckpt={bad}")
    payload = torch.load(ckpt, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        run_sample(f"ckpt={tmp_path / 'v99.pt'}")


def test_prompt_characters_outside_the_vocabulary_are_named(ckpt):
    with pytest.raises(DataError, match=r"2 character\(s\).*'Z'.*'é'"):
        # Hydra's override grammar needs quotes around non-ASCII text (or use prompt=- / prompt_file).
        run_sample(f"ckpt={ckpt}", "prompt='Zé Speak é'")


def test_empty_prompt_starts_from_the_newline_token(ckpt, caplog):
    with caplog.at_level(logging.WARNING):
        out = gen(ckpt, "prompt=", "temperature=0")
    assert "empty prompt" in caplog.text and "\\n" in caplog.text
    assert len(out) == 40 + 1  # 40 generated characters, then the final newline; the start token is not shown


def test_prompt_longer_than_the_context_keeps_the_last_block(ckpt, caplog):
    long = "Speak, speak. " * 5  # 70 characters, context 32
    with caplog.at_level(logging.WARNING):
        out = gen(ckpt, f"prompt='{long}'", "temperature=0")
    assert "keeping the last 32" in caplog.text
    assert out.startswith(long[-32:]) and not out.startswith(long)
    tok = CharTokenizer.from_text([TEXT])
    assert encode_prompt(tok, long, 32) == tok.encode(long)[-32:]


@pytest.mark.parametrize("override,message", [
    ("temperature=-0.5", "temperature must be >= 0"),
    ("top_k=0", "top_k must be >= 1"),
    ("top_p=0", r"top_p must be in \(0, 1\]"),
    ("top_p=1.5", r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_settings_are_refused(ckpt, override, message):
    with pytest.raises(ValueError, match=message):
        run_sample(f"ckpt={ckpt}", override)


def test_top_k_above_the_vocabulary_is_clamped_with_a_warning(ckpt, caplog):
    with caplog.at_level(logging.WARNING):
        out = gen(ckpt, "prompt=All", "top_k=1000", "seed=3")
    vocab = len(CharTokenizer.from_text([TEXT]).chars)
    assert f"top_k=1000 is larger than the vocabulary ({vocab} tokens)" in caplog.text
    assert out == gen(ckpt, "prompt=All", "top_k=null", "seed=3")  # top_k = vocab keeps every token


def test_untrained_preset_cannot_generate_text():
    with pytest.raises(ValueError, match="untrained model"):
        run_sample("model=tiny")


# ---- the command line end to end (subprocesses: slower, so only two) ------------------------------
def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", "device=cpu", "threads=1", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def test_cli_streams_text_to_stdout_and_speed_to_stderr(ckpt):
    p = _cli(f"ckpt={ckpt}", "prompt=-", "max_new_tokens=25", "temperature=0", stdin="Speak")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Speak") and len(p.stdout) == len("Speak") + 25 + 1
    assert "25 tokens in" in p.stderr and "tokens/s" in p.stderr


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    p = _cli(f"ckpt={tmp_path / 'missing.pt'}")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint") and "missing.pt" in lines[0]
    assert "Traceback" not in p.stderr


def test_a_padded_vocabulary_never_yields_ids_past_the_tokenizer(tmp_path):
    # model.vocab_size=64 over a 20-character tokenizer (as gpt2_124m pads 50257 to 50304): the 44
    # extra rows of an untrained head get as much probability as real ones, so without the cap hot
    # sampling would draw them at once and the char tokenizer could not decode them.
    tok = CharTokenizer.from_text([TEXT])
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "padded.pt", {"model": GPT(cfg).state_dict(), "model_config": cfg.to_dict(),
                                                    "tokenizer": tok.to_json(), "config": {}, "step": 0})
    code, out, err = run_sample(f"ckpt={path}", "prompt=Speak", "max_new_tokens=300", "temperature=2.0", "seed=3")
    assert code == 0, err
    assert set(out) <= set(TEXT) and len(out) == len("Speak") + 300 + 1
