"""optim=muon: torch.optim.Muon for the blocks' 2-D weights and AdamW for the rest, driven as one
optimizer. The parameter split, Muon's scaled lr, the GradScaler over both parts, a short run through
train.train, a crash-and-resume that ends bit-identical, checkpoints across optimizers refused, the
error without torch.optim.Muon, and DDP / FSDP2 under torchrun (slow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_train, preset_config, run_script

import train
from engine.config import OptimConfig
from engine.optim import MuonAdamW, build_optimizer, lr_at, muon_split, set_lr
from model import GPT

MUON_CFG = OptimConfig(name="muon", lr=1e-3, min_lr=1e-4, muon_lr=0.02, warmup_iters=2)


def _hidden_matrices(n_layer: int) -> set[str]:
    return {f"h.{i}.{m}.weight" for i in range(n_layer)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False, "bias": False, "norm": "pre", "pos": "rope"}])
def test_split_puts_every_parameter_in_exactly_one_optimizer(overrides):
    model = GPT(preset_config("tiny", n_layer=2, vocab_size=50, **overrides))
    muon, adamw = muon_split(model)
    assert {n for n, _ in muon} == _hidden_matrices(2)
    adamw_names = {n for n, _ in adamw}
    assert "wte.weight" in adamw_names and ("wpe.weight" in adamw_names) == (model.config.pos == "learned")
    assert ("lm_head.weight" in adamw_names) == (not model.config.tie_weights)  # tied: it is wte.weight
    assert all(p.dim() == 1 for n, p in adamw if n.startswith("h."))  # norms and biases of the blocks

    opt = build_optimizer(model, MUON_CFG, "cpu")
    assert isinstance(opt, MuonAdamW)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]} == {id(p) for _, p in muon}


def test_muon_follows_the_schedule_scaled_by_muon_lr():
    model = GPT(preset_config("tiny", n_layer=1, vocab_size=50))
    opt = build_optimizer(model, MUON_CFG, "cpu")
    for step in (0, 1, 50, 99):
        lr = lr_at(step, MUON_CFG, max_iters=100)
        set_lr(opt, lr)
        assert [g["lr"] for g in opt.parts["adamw"].param_groups] == [lr, lr]
        assert opt.parts["muon"].param_groups[0]["lr"] == pytest.approx(lr * 20)  # muon_lr / lr = 0.02 / 1e-3


def test_grad_scaler_unscales_and_skips_both_parts():
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", n_layer=1, n_embd=32, n_head=2, block_size=8, vocab_size=20))
    opt = build_optimizer(model, MUON_CFG, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randint(0, 20, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, loss = model(x, x)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # every parameter of both parts: gradients back to their true size
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.dim() == 2)

    # An inf in one Muon matrix's gradient skips the step of both optimizers.
    opt.zero_grad()
    _, loss = model(x, x)
    scaler.scale(loss).backward()
    model.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert scaler.get_scale() == 512.0


def test_optim_muon_trains_and_checkpoints_both_states_by_name(tiny_overrides, tmp_path):
    summary = train.train(compose_train([*tiny_overrides, "optim=muon", "optim.warmup_iters=2"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val/loss"] for r in records if "val/loss" in r]
    assert summary["step"] == 20 and vals[-1] < vals[0] - 0.1
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["config"]["optim"]["name"] == "muon"
    assert set(ckpt["optimizer"]) == {"muon", "adamw"}
    assert set(ckpt["optimizer"]["muon"]["state"]) == _hidden_matrices(1)
    tied = {"lm_head.weight"}  # the state dict lists the tied head; the optimizers hold it once, as wte
    assert set(ckpt["optimizer"]["adamw"]["state"]) == set(ckpt["model"]) - _hidden_matrices(1) - tied
    assert ckpt["optimizer"]["muon"]["param_groups"][0]["lr"] == pytest.approx(
        20 * lr_at(19, compose_train([*tiny_overrides, "optim=muon", "optim.warmup_iters=2"]).optim, 20))


def test_crash_then_resume_with_muon_is_bit_identical(tiny_overrides, tmp_path, monkeypatch):
    recipe = [*tiny_overrides, "optim=muon", "max_iters=12", "eval_interval=4", "ckpt_interval=4",
              "model.dropout=0.1", "gradient_accumulation_steps=2", "optim.warmup_iters=2"]
    train.train(compose_train([*recipe, f"out_dir={tmp_path / 'ref'}"]))

    # The save of last.pt at step 8 crashes the run: last.pt stays at step 4, steps 5-8 are redone.
    import engine.state
    real_save = engine.state.save_checkpoint

    def crash_at_step_8(path: Path, payload: dict, **kw) -> None:
        if path.name == "last.pt" and payload["step"] == 8:
            raise KeyboardInterrupt("crash")
        real_save(path, payload, **kw)

    run = tmp_path / "crashed"
    monkeypatch.setattr(engine.state, "save_checkpoint", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train.train(compose_train([*recipe, f"out_dir={run}"]))
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(engine.state, "save_checkpoint", real_save)
    assert train.train(compose_train([*recipe, f"out_dir={run}", "resume=auto"]))["step"] == 12

    want = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    got = torch.load(run / "last.pt", weights_only=True)
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), f"{name} differs after resume"
    for part in ("muon", "adamw"):
        for name, state in want["optimizer"][part]["state"].items():
            for key, value in state.items():
                assert torch.equal(got["optimizer"][part]["state"][name][key], value), f"{part} {name}.{key}"
    assert got["loader_state"] == want["loader_state"] and got["best_val"] == want["best_val"]


@pytest.mark.parametrize(("first", "then", "message"), [
    ("adamw", "muon", "the checkpoint holds adamw optimizer state but this run's optimizer is adamw[+]muon"),
    ("muon", "adamw", "the checkpoint holds adamw[+]muon optimizer state but this run's optimizer is adamw:"),
])
def test_resuming_with_the_other_optimizer_is_refused(tiny_overrides, tmp_path, first, then, message):
    train.train(compose_train([*tiny_overrides, f"optim={first}", "max_iters=2"]))
    with pytest.raises(ValueError, match=message + ".*init_from=<checkpoint>"):
        train.train(compose_train([*tiny_overrides, f"optim={then}", "max_iters=4", "resume=auto"]))


def test_torch_without_muon_is_one_clear_line(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    model = GPT(preset_config("tiny", n_layer=1, vocab_size=50))
    with pytest.raises(ValueError, match=rf"needs torch.optim.Muon \(torch >= 2.9\); the installed torch "
                                         rf"{re.escape(torch.__version__)} lacks it: upgrade torch, or use optim=adamw") as e:
        build_optimizer(model, MUON_CFG, "cpu")
    assert "\n" not in str(e.value)
    assert isinstance(build_optimizer(model, OptimConfig(), "cpu"), torch.optim.AdamW)  # adamw unaffected


def test_bad_muon_settings_are_refused():
    with pytest.raises(ValueError, match=r"optim.name='sgd' is not valid; choose one of \['adamw', 'muon'\]"):
        compose_train(["optim.name=sgd"])
    with pytest.raises(ValueError, match="optim.muon_momentum=1.0"):
        OptimConfig(name="muon", muon_momentum=1.0)
    with pytest.raises(ValueError, match="optim.muon_adjust_lr='rms' is not valid"):
        OptimConfig(name="muon", muon_adjust_lr="rms")
    cfg = compose_train(["optim=muon", "optim.schedule=wsd"]).optim
    assert (cfg.name, cfg.schedule, cfg.muon_lr, cfg.lr) == ("muon", "wsd", 0.02, 1e-3)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "last.pt", weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_muon_under_ddp_and_fsdp_matches_one_process(tiny_overrides, tmp_path):
    """Micro-batch g of a step comes from stream g, so two processes see the windows one process with
    two accumulation steps sees. DDP gives Muon the same all-reduced gradients: the same weights.
    FSDP2 runs Newton-Schulz on DTensor shards of whole matrices: the same up to bf16 rounding, far
    closer than a run on other windows (orthogonalising each shard alone would not be)."""
    keep = [a for a in tiny_overrides if not a.startswith("out_dir=")]
    recipe = [*keep, "optim=muon", "max_iters=6", "eval_interval=3", "eval_iters=3", "optim.lr=1e-2",
              "optim.warmup_iters=1", "sample_tokens=4"]
    train.train(compose_train([*recipe, "gradient_accumulation_steps=2", f"out_dir={tmp_path / 'one'}"]))
    train.train(compose_train([*recipe, "batch_size=8", f"out_dir={tmp_path / 'other'}"]))
    for mode in ("ddp", "fsdp"):
        r = run_script(["torchrun", "--standalone", "--nproc_per_node=2", "train.py", *recipe,
                        f"distributed={mode}", f"out_dir={tmp_path / mode}"], timeout=240)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    one = _weights(tmp_path / "one")
    other = _max_diff(one, _weights(tmp_path / "other"))
    assert other > 1e-2
    assert _max_diff(one, _weights(tmp_path / "ddp")) < 1e-4
    assert _max_diff(one, _weights(tmp_path / "fsdp")) < other / 10
    ckpt = torch.load(tmp_path / "fsdp" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and set(ckpt["optimizer"]["muon"]["state"]) == _hidden_matrices(1)
    # Full, name-keyed states: the FSDP checkpoint resumes in one process.
    resumed = train.train(compose_train([*recipe, "gradient_accumulation_steps=2", "max_iters=8",
                                         f"resume={tmp_path / 'fsdp'}", f"out_dir={tmp_path / 'resumed'}"]))
    assert resumed["step"] == 8
