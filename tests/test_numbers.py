"""The numbers a run reports and the ones it trains with, each held to a hand computation:

- bits per byte counts the UTF-8 bytes each target token stands for (specials 0, their loss left
  out), however a window's edge cuts a character;
- the learning rate of the last step that runs (max_iters - 1) is min_lr, for cosine and wsd;
- the MFU peak is looked up by whole GPU names as torch reports them, and an unknown GPU has none;
- the logged train loss is one number per step (engine.step.log_values);
- generation ends at the end-of-text token (generate_tokens, the eval sample, sample.py's CLI);
- Muon orthogonalises c_attn's W_q, W_k and W_v as three matrices;
- a step whose gradient norm is not finite is skipped, the loss being finite.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_same, compose_train, snapshot
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models

import train
from data.tokenizer import EOT, CharTokenizer, HFTokenizer, train_bpe
from engine.checkpoint import save_checkpoint
from engine.config import OptimConfig
from engine.evaluate import estimate_loss, generate_sample
from engine.metrics import read_metrics
from engine.optim import AdamW, Muon, build_optimizer, lr_at
from engine.runtime import Runtime, peak_flops_for
from engine.step import log_values, train_step
from model import GPT, ModelConfig
from model.generate import generate_tokens

CPU = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", compile=False)
DOCS = ["Hello world! 日本語のテキストです。🙂🚀 The end.", "Émoji 👍🏽 and CJK 中文混合 in one line, ünïcödé too.",
        "Plain ASCII text, then 한국어 문장 and 🎉🐍🤖 at the close.", "東京は大きな都市です。Tokyo is big. ❤️"] * 6


# ---- bits per byte ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe(iter(DOCS), vocab_size=300)  # small: many characters stay split across tokens


def _eval_batches(tok: HFTokenizer, T: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """The documents as prepare writes them (EOT before each), cut into (x, y) windows of T tokens
    (a last, shorter batch takes the rest), and the target ids in order: every token after the first."""
    ids: list[int] = []
    for doc in DOCS:
        ids += [tok.eot_id, *tok.encode(doc)]
    x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    n = len(y) // T * T
    batches = [(x[:n].view(-1, T), y[:n].view(-1, T))]  # (B, T)
    if n < len(y):
        batches.append((x[n:].view(1, -1), y[n:].view(1, -1)))  # (1, rest)
    return batches, ids[1:]


def test_bpb_counts_the_utf8_bytes_of_the_target_text_and_leaves_specials_out(bpe):
    T = 7
    batches, targets = _eval_batches(bpe, T)
    table = torch.as_tensor(bpe.token_bytes())
    assert table[bpe.eot_id] == 0
    # The counted bytes are the UTF-8 length of the target text without its specials ...
    text = "".join(DOCS)  # the targets: every document, the EOTs between them left out
    assert bpe.tok.decode(targets, skip_special_tokens=True) == text
    assert sum(int(table[y].sum()) for _, y in batches) == len(text.encode("utf-8"))
    # ... where decoding each window alone would count EOTs as 13 bytes and cut characters as U+FFFD.
    rows = [r for _, y in batches for r in y.tolist()]
    assert any(bpe.eot_id in r for r in rows) and any("\ufffd" in bpe.decode(r) for r in rows)
    assert sum(len(bpe.decode(r).encode()) for r in rows) != len(text.encode("utf-8"))

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=bpe.vocab_size, block_size=T, n_layer=1, n_head=2, n_embd=16))
    result = estimate_loss(model, batches, CPU, token_bytes=table)
    model.eval()
    with torch.no_grad():  # by hand: float64 log-probabilities of every target
        nats = torch.cat([-F.log_softmax(model(x)[0].double(), -1).gather(-1, y[..., None]).flatten()
                          for x, y in batches])
    y_all = torch.tensor(targets)
    special = y_all == bpe.eot_id
    assert special.sum() == len(DOCS) - 1
    assert result.bpb == pytest.approx(nats[~special].sum().item() / math.log(2) / len(text.encode()), rel=1e-6)
    assert result.loss == pytest.approx(nats.mean().item(), rel=1e-6)  # val/loss: every target, EOTs too
    assert estimate_loss(model, batches, CPU).loss == pytest.approx(result.loss, rel=1e-6)  # the model's own loss


def test_token_bytes_of_char_and_pretrained_tokenizers():
    char = CharTokenizer.from_text(["aé日🙂"], unk=True)
    assert char.token_bytes().tolist() == [1, 2, 3, 4, 0]  # <unk> stands for no known bytes
    # A SentencePiece-style tokenizer: "\u2581" for a space, byte-fallback tokens, specials.
    vocab = {"<unk>": 0, "</s>": 1, "<0xE6>": 2, "\u2581hello": 3, "lo": 4, "日": 5, "\u2581": 6}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    rust.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    rust.add_special_tokens(["<unk>", "</s>"])
    rust.add_tokens(["<custom>"])  # an added token that is text, not special
    sp = HFTokenizer(rust, "pretrained")
    assert sp.token_bytes().tolist() == [0, 0, 1, 6, 2, 3, 1, 8]


def test_a_run_logs_bpb_from_the_byte_table(tiny_overrides, tmp_path):
    """Through train.train: val/bpb and the final bpb come from the table, not from decoded rows."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, doc in enumerate(DOCS):
        (docs / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    args = [a for a in tiny_overrides if not a.startswith("data.path=")]
    summary = train.train(compose_train([*args, f"data.path={docs}", "data.tokenizer=bpe", "data.vocab_size=300",
                                         "max_iters=2", "eval_interval=2", "final_eval_iters=-1"]))
    assert math.isfinite(summary["final_bpb"]) and summary["final_bpb"] > 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(r["val/bpb"]) for r in records if "val/loss" in r)


# ---- schedules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.parametrize(("max_iters", "warmup", "decay_iters"), [
    (100, 10, None), (100, 10, 100), (100, 10, 60), (7, 2, None), (7, 2, 7), (2, 0, None), (1, 0, None), (50, 0, 50),
])
def test_the_last_step_that_runs_is_at_min_lr(schedule, max_iters, warmup, decay_iters):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=warmup, schedule=schedule, decay_iters=decay_iters)
    lrs = [lr_at(s, cfg, max_iters) for s in range(max_iters)]  # the steps that run: 0 .. max_iters - 1
    assert lrs[-1] == cfg.min_lr
    assert lrs[:warmup] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])  # warm-up unchanged
    if warmup < max_iters - 1:
        assert lrs[warmup] == 1.0  # the first step after the warm-up runs at the peak
        assert lrs[-2] > cfg.min_lr or (schedule == "cosine" and decay_iters and decay_iters < max_iters)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))
    if schedule == "cosine" and decay_iters:  # min_lr from step decay_iters - 1 on, not before
        assert lrs[decay_iters - 1] == cfg.min_lr and lrs[decay_iters - 2] > cfg.min_lr


def test_a_warmup_as_long_as_the_run_is_unchanged():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10)
    assert [lr_at(s, cfg, 5) for s in range(5)] == pytest.approx([(s + 1) / 11 for s in range(5)])


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_the_loop_runs_its_last_step_at_min_lr(tiny_overrides, tmp_path, schedule):
    """The lr the loop sets on the optimizer for its last step, as metrics.jsonl logs it."""
    train.train(compose_train([*tiny_overrides, "max_iters=10", "log_interval=1", "optim.warmup_iters=2",
                               "optim.lr=1e-3", "optim.min_lr=1e-4", f"optim.schedule={schedule}"]))
    lrs = {r["step"]: r["opt/lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "opt/lr" in r}
    assert sorted(lrs) == list(range(1, 11))  # the record of step k holds the lr of step k - 1
    assert lrs[10] == 1e-4 and lrs[9] > 1e-4 and lrs[3] == 1e-3


# ---- MFU ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362),
    ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA GeForce RTX 3090", 71), ("Tesla V100-SXM2-16GB", 125),
    ("NVIDIA GeForce RTX 3090 Ti", None), ("NVIDIA GeForce RTX 4080", None), ("Tesla T4", None),
    ("NVIDIA H800", None), ("NVIDIA B200", None), ("NVIDIA RTX A6000", None), ("NVIDIA A10G", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None), ("NVIDIA L40G", None),
])
def test_peak_flops_by_whole_gpu_name(name, tflops):
    assert peak_flops_for(name) == (tflops * 1e12 if tflops else None)


def test_peak_flops_of_the_runtime(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    gpu = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cuda"), precision="bf16", compile=False)
    assert gpu.peak_flops() == 181e12  # not the L4's 121
    fp32 = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cuda"), precision="fp32", compile=False)
    assert fp32.peak_flops() is None and fp32.peak_flops(override=5e13) == 5e13


def test_log_values_in_one_process():
    assert log_values(torch.tensor(2.5), torch.tensor(0.75), CPU) == (2.5, 0.75)


# ---- stop at the end-of-text token --------------------------------------------------------------
def _tiny_model(vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_tokens_ends_before_the_stop_token(use_cache):
    model, idx = _tiny_model(12), torch.tensor([[1, 2]])  # (1, 2)

    def draw(**kw) -> list[int]:
        gen = torch.Generator().manual_seed(3)
        return [int(t) for t in generate_tokens(model, idx, 40, use_cache=use_cache, generator=gen, **kw)]

    full = draw()
    stop = full[5]
    cut = draw(stop_id=stop)
    assert cut == full[:full.index(stop)] and stop not in cut
    assert draw(stop_id=99) == full  # never drawn: the whole length
    with pytest.raises(ValueError, match="stop_id ends one sequence; the prompt is a batch of 2"):
        list(generate_tokens(model, idx.repeat(2, 1), 4, stop_id=stop))


def test_the_eval_sample_ends_at_the_end_of_text_token():
    model = _tiny_model(12)
    full = generate_sample(model, [1], 30, CPU, seed=0)
    stop = full[4]
    assert generate_sample(model, [1], 30, CPU, seed=0, stop_id=stop) == full[:full.index(stop)]


@pytest.fixture(scope="module")
def eot_checkpoint(tmp_path_factory, bpe) -> Path:
    """A BPE checkpoint whose every next token is drawn from one fixed distribution that gives the
    end-of-text token about 4 %: the last block's norm outputs a constant, e_0, whose logits are
    column 0 of the tied embedding."""
    model = _tiny_model(bpe.vocab_size)
    state = model.state_dict()
    state["h.0.ln_2.weight"].zero_()
    state["h.0.ln_2.bias"].zero_()
    state["h.0.ln_2.bias"][0] = 1.0
    state["wte.weight"][:, 0] = 0.0
    state["wte.weight"][bpe.eot_id, 0] = 2.5
    return save_checkpoint(tmp_path_factory.mktemp("eot") / "last.pt", {
        "model": state, "model_config": model.config.to_dict(), "tokenizer": bpe.to_json(), "config": {}, "step": 0})


def test_sample_cli_stops_at_the_end_of_text_token(eot_checkpoint):
    def sample(*args: str) -> tuple[str, str]:
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={eot_checkpoint}", "device=cpu",
                            "prompt=Hello", "max_new_tokens=200", "temperature=1.0", "seed=5", *args],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout, r.stderr

    def n_tokens(stderr: str) -> int:  # "<n> tokens in <s> s: ..." on the last line
        return int(stderr.strip().splitlines()[-1].split(" tokens in ")[0])

    (on, on_err), (off, off_err) = sample(), sample("stop_at_eot=false")
    assert EOT in off and n_tokens(off_err) == 200  # the model does end its texts; without the stop, printed
    assert EOT not in on and on == off[:off.index(EOT)] + "\n"  # the same draws, up to the first EOT
    assert 0 < n_tokens(on_err) < 200


# ---- Muon ---------------------------------------------------------------------------------------
def test_muon_orthogonalises_q_k_v_as_three_matrices():
    """Muon with c_attn split gives, step after step, the weights three torch.optim.Muon matrices
    of C x C get; an unsplit matrix gets torch's update exactly; one Newton-Schulz over the whole
    3C x C would be another update."""
    torch.manual_seed(0)
    C = 16
    qkv, other = torch.nn.Parameter(torch.randn(3 * C, C)), torch.nn.Parameter(torch.randn(4 * C, C))
    three = [torch.nn.Parameter(qkv.detach()[i * C:(i + 1) * C].clone()) for i in range(3)]
    other_ref, fused = torch.nn.Parameter(other.detach().clone()), torch.nn.Parameter(qkv.detach().clone())
    kw = {"lr": 0.02, "weight_decay": 0.01, "momentum": 0.95, "nesterov": True}
    ours = Muon([qkv, other], split={id(qkv): 3}, **kw)
    ref, whole = torch.optim.Muon([*three, other_ref], **kw), torch.optim.Muon([fused], **kw)
    for _ in range(3):
        g, g_other = torch.randn(3 * C, C), torch.randn(4 * C, C)
        qkv.grad, other.grad, other_ref.grad, fused.grad = g.clone(), g_other.clone(), g_other.clone(), g.clone()
        for i, p in enumerate(three):
            p.grad = g[i * C:(i + 1) * C].clone()
        ours.step()
        ref.step()
        whole.step()
        assert torch.equal(qkv.detach(), torch.cat([p.detach() for p in three]))
        assert torch.equal(other.detach(), other_ref.detach())
    assert (qkv - fused).abs().max() > 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_without_the_compile_guards_is_torchs_adamw(fused):
    """engine.optim.AdamW (torch's methods unwrapped from their torch.compile guards) gives torch.optim.AdamW's
    weights bit for bit, step after step, through state-dict round trips, a found_inf skip included (fused)."""
    torch.manual_seed(0)
    ours_p = torch.nn.Parameter(torch.randn(8, 4))
    ref_p = torch.nn.Parameter(ours_p.detach().clone())
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "fused": fused}
    ours, ref = AdamW([ours_p], **kw), torch.optim.AdamW([ref_p], **kw)
    for step in range(4):
        g = torch.randn(8, 4)
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        skip = fused and step == 2  # a skipped step, asked for as engine/step.py does
        for opt in (ours, ref):
            if skip:
                opt.grad_scale, opt.found_inf = None, torch.ones(())
            opt.step()
            if skip:
                del opt.grad_scale, opt.found_inf
        ours.zero_grad()
        assert ours_p.grad is None and torch.equal(ours_p.detach(), ref_p.detach())
        ours.load_state_dict(ours.state_dict())
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert all(torch.equal(mine["state"][0][k], theirs["state"][0][k]) for k in theirs["state"][0])


def test_build_optimizer_splits_every_c_attn():
    model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16))
    opt = build_optimizer(model, OptimConfig(name="muon"), "cpu")
    muon = opt.parts["muon"]
    assert isinstance(muon, Muon)
    assert muon.split == {id(model.h[i].attn.c_attn.weight): 3 for i in range(2)}


# ---- the non-finite guard: a finite loss with a non-finite gradient -----------------------------
@pytest.mark.parametrize("extra", [("optim.fused=true",), ("optim.fused=false",), ("optim=muon",)],
                         ids=["fused", "foreach", "muon"])
def test_a_finite_loss_with_a_non_finite_gradient_is_skipped(make_run, extra):
    """Without a GradScaler the gradient norm decides too: an inf in one gradient (the loss finite)
    skips the step, on the fused kernel's found_inf, on foreach AdamW and on Muon (a host read)."""
    run = make_run(*extra)
    train_step(run.state, run.train_model, [s.next_batch() for s in run.streams], 1e-3, 1.0)  # optimizer state
    before = snapshot(run)
    handle = run.model.h[0].mlp.c_fc.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss, norm, skipped = train_step(run.state, run.train_model, [s.next_batch() for s in run.streams], 1e-3, 1.0)
    handle.remove()
    assert torch.isfinite(loss) and not torch.isfinite(norm) and skipped.item() == 1.0
    (model_a, opt_a), (model_b, opt_b) = before, snapshot(run)
    for part in ("muon", "adamw") if "muon" in opt_a else (None,):  # MuonAdamW: one state dict a part
        assert_same((model_a, opt_a[part] if part else opt_a), (model_b, opt_b[part] if part else opt_b))
