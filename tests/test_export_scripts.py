"""scripts/export.py and scripts/export_hf.py end to end, in subprocesses as a user runs them: the
written directories load, and each bad input is one `error: ...` line with exit status 2."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer import CharTokenizer
from engine.checkpoint import save_checkpoint
from engine.formats.pretrained import from_pretrained
from model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def run(script, *args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def run_dir(tmp_path, **overrides) -> tuple[Path, GPT]:
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(["hello causal world\n"])
    cfg = ModelConfig(**{**dict(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16,
                                norm="pre", activation="gelu_tanh"), **overrides})
    model = GPT(cfg).eval()
    save_checkpoint(tmp_path / "run" / "best.pt", {"model": model.state_dict(), "model_config": cfg.to_dict(),
                                                   "tokenizer": tok.to_json(), "config": {}, "step": 1})
    return tmp_path / "run", model


def test_export_script_writes_a_loadable_export(tmp_path):
    run_path, model = run_dir(tmp_path, norm="post", pos="rope")  # any model exports in our format
    out = tmp_path / "export"
    result = run("export.py", f"ckpt={run_path}", f"out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    loaded = from_pretrained(out)
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def call_main(main, capsys, *args):
    """Run a script's main in-process (the subprocess start-up is the slow part); returns the
    exit status, stdout and stderr."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_export_script_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from scripts.export import main
    run_path, _ = run_dir(tmp_path)
    out = tmp_path / "export"
    assert call_main(main, capsys, f"ckpt={run_path}", f"out={out}").returncode == 0
    assert_one_line_error(call_main(main, capsys, f"ckpt={run_path}", f"out={out}"), "not empty", "overwrite=true")
    assert call_main(main, capsys, f"ckpt={run_path}", f"out={out}", "overwrite=true").returncode == 0
    assert_one_line_error(call_main(main, capsys, f"ckpt={tmp_path / 'nope'}", f"out={tmp_path / 'o'}"),
                          "does not exist")
    assert_one_line_error(call_main(main, capsys, f"ckpt={run_path}"), "missing out=")
    assert_one_line_error(call_main(main, capsys, f"ckpt={run_path}", "out=x", "verbose=1"),
                          "unexpected argument 'verbose=1'")
    assert_one_line_error(call_main(main, capsys, f"ckpt={run_path}", "out=x", "overwrite=maybe"),
                          "overwrite='maybe' must be true or false")


@pytest.mark.hf
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs the optional transformers extra")
def test_export_hf_script_writes_what_transformers_loads(tmp_path):
    import transformers
    run_path, model = run_dir(tmp_path)
    out = tmp_path / "hf"
    result = run("export_hf.py", f"ckpt={run_path}", f"out={out}")
    assert result.returncode == 0, result.stderr
    assert "verified: transformers reloads it" in result.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == \
        CharTokenizer.from_text(["hello causal world\n"]).encode("hello")


def test_export_hf_script_refuses_post_ln_and_rope_naming_the_setting(tmp_path, capsys):
    from scripts.export_hf import main
    for setting, named, why in (({"norm": "post"}, "model.norm=post", "GPT-2 is pre-LN"),
                                ({"pos": "rope"}, "model.pos=rope", "learned position embeddings")):
        run_path, _ = run_dir(tmp_path, **setting)
        result = call_main(main, capsys, f"ckpt={run_path}", f"out={tmp_path / 'hf'}")
        assert_one_line_error(result, named, why, "scripts/export.py")
        assert not (tmp_path / "hf").exists()


def test_export_hf_script_without_transformers_says_how_to_install(tmp_path):
    fake = tmp_path / "site" / "transformers"
    fake.mkdir(parents=True)  # shadows the real package, as if it were not installed
    (fake / "__init__.py").write_text("raise ImportError('No module named transformers')\n")
    run_path, _ = run_dir(tmp_path)
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = run("export_hf.py", f"ckpt={run_path}", f"out={tmp_path / 'hf'}", env=env)
    assert_one_line_error(result, "pip install -e '.[hf]'")
    assert not (tmp_path / "hf").exists()
