"""model/linear.py: the one-row CPU path gives nn.Linear's numbers, and only one-row no-grad
inputs take it (training and batches keep F.linear, gradients included)."""

import pytest
import torch
import torch.nn.functional as F

from model.linear import Linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 48), (48,)])
def test_one_row_matches_linear_and_takes_the_batched_path(bias, shape, monkeypatch):
    torch.manual_seed(0)
    layer = Linear(48, 96, bias=bias)
    x = torch.randn(shape)
    expected = F.linear(x, layer.weight, layer.bias)
    calls = []
    for name in ("bmm", "baddbmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    with torch.no_grad():
        y = layer(x)
    assert calls == ["baddbmm" if bias else "bmm"]
    assert y.shape == expected.shape == (*shape[:-1], 96)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_compiled_one_row_matches_linear():
    torch.manual_seed(0)
    layer = Linear(32, 64)
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        y = torch.compile(layer, backend="eager", fullgraph=True)(x)  # traces the multiply-and-sum form
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_batches_gradients_and_odd_sizes_use_plain_linear(monkeypatch):
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: pytest.fail("batched path taken"))
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: pytest.fail("batched path taken"))
    layer = Linear(16, 32)
    with torch.no_grad():
        layer(torch.randn(2, 16))  # two rows
        Linear(16, 30)(torch.randn(1, 16))  # out_features not divisible into slices
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(torch.randn(1, 16))
    x = torch.randn(1, 16, requires_grad=True)
    layer(x).sum().backward()  # training: F.linear and its gradient
    assert x.grad is not None and layer.weight.grad is not None


def test_compiling_under_aten_cpu_capability_skips_inductors_graph_caches(monkeypatch):
    import torch._functorch.config
    import torch._inductor.config

    from model.generate import compile_isa_safe

    # config.patch restores both settings afterwards (monkeypatch.setattr would delete them on undo:
    # torch's config modules hold no such attribute in their __dict__, and a later compile then fails)
    with torch._inductor.config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True):
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        compile_isa_safe(torch.nn.Identity())
        assert torch._inductor.config.fx_graph_cache  # left alone without the variable
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
        compiled = compile_isa_safe(torch.nn.Identity())
        assert not torch._inductor.config.fx_graph_cache and not torch._functorch.config.enable_autograd_cache
        x = torch.randn(3)
        assert torch.equal(compiled(x), x)
