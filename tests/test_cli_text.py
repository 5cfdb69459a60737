"""Free text on the command line: prompts, paths and W&B names are taken exactly as the shell hands
them over (cli.quote_free_text), while Hydra's own syntax keeps working for everything else.

The prompt table runs through sample.py's real `__main__` block, argv and all: one Python process
runs it once per prompt (runpy), generating one greedy token from a checkpoint whose character
vocabulary holds every character of the table, and the text the program echoes must be the prompt
itself. mode=attention and mode=leakage get the same treatment, with an out_dir and a ckpt path
that need quoting too.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from conftest import ROOT, run_script
from hydra import compose, initialize_config_dir

import cli
from data.tokenizer import CharTokenizer
from engine.checkpoint import save_checkpoint
from model import GPT, ModelConfig

B = "\\"
PROMPTS = [
    "To be, or not to be",
    "日本語",
    'He said "hi"',
    "a=b",
    "[x]",
    "it's",
    "${oops}",
    "",
    "  two spaces each side  ",
    "key: value, {a: 1}",
    "C:" + B + "temp" + B,          # a trailing backslash
    B + "${HOME} and ${x:y}",       # a backslash before an interpolation
    "it" + B + "'s",                # a backslash before a quote
    "null",
    "line one\nline two",
    "100% (approx) ~x +y -z",
    "Où est-il ? 🙂",
]

# Runs sample.py's `if __name__ == "__main__":` block once per argv, each with its own stdout/stderr.
DRIVER = r"""
import contextlib, io, json, os, runpy, sys
os._exit = sys.exit  # cli.run_and_exit's end of the process, as the SystemExit caught below
results = []
for argv in json.load(open(sys.argv[1], encoding="utf-8")):
    sys.argv = ["sample.py", *argv]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path("sample.py", run_name="__main__")
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory) -> tuple:
    """An untrained char-level checkpoint whose vocabulary has every character of PROMPTS, in a
    directory whose name itself needs quoting (a comma, a space, an `=`)."""
    tok = CharTokenizer.from_text(["".join(PROMPTS) + "abcdefghijklmnopqrstuvwxyz\n"])
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "run 1, a=b" / "last.pt"
    path.parent.mkdir()
    save_checkpoint(path, {"model": GPT(cfg).state_dict(), "model_config": cfg.to_dict(),
                           "tokenizer": tok.to_json(), "config": {}, "step": 0})
    return path, tok


def test_prompts_as_typed_through_sample_py(odd_ckpt, tmp_path):
    ckpt, tok = odd_ckpt
    common = [f"ckpt={ckpt}", "device=cpu", "threads=1", "temperature=0", "max_new_tokens=1"]
    runs = [[*common, f"prompt={p}"] for p in PROMPTS]
    odd_dir = tmp_path / "maps, [v2] a=b"
    runs += [[*common, "mode=attention", f"prompt={PROMPTS[1]}", f"out_dir={odd_dir}/attention"],
             [*common, "mode=leakage", f"prompt={PROMPTS[0]}", f"out_dir={odd_dir}/leakage", "leakage.trials=1",
              "leakage.influence_len=4", "leakage.probes=1", "leakage.gen_tokens=2"]]
    (tmp_path / "argv.json").write_text(json.dumps(runs), encoding="utf-8")
    r = run_script(["-c", DRIVER, str(tmp_path / "argv.json")], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.splitlines()[-1])
    for prompt, res in zip(PROMPTS, results, strict=False):
        assert res["code"] == 0, (prompt, res["err"][-1500:])
        # The echoed prompt, one greedy token (one character), a newline.
        assert res["out"][:len(prompt)] == prompt and len(res["out"]) == len(prompt) + 2, (prompt, res["out"])
    attention, leakage = results[len(PROMPTS):]
    assert attention["code"] == 0, attention["err"][-1500:]
    ids = json.loads((odd_dir / "attention" / "attention.json").read_text())["prompt_ids"]
    assert tok.decode(ids) == PROMPTS[1]
    assert leakage["code"] == 0, leakage["err"][-1500:]
    ids = json.loads((odd_dir / "leakage" / "leakage.json").read_text())["prompt_ids"]
    assert tok.decode(ids) == PROMPTS[0]


def compose_sample(argv: list[str]):
    """sample.yaml composed from argv the way sample.py's __main__ hands it to Hydra."""
    import sample
    sample.register_configs()
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        return compose("sample", overrides=cli.quote_free_text(["sample.py", *argv], cli.SAMPLE_TEXT)[1:])


def test_every_string_means_itself():
    """Random strings over the characters that are special to the shell, Hydra or OmegaConf, through
    the two steps Hydra takes with an override: its parser, then an OmegaConf node read back."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    rng = random.Random(0)
    alphabet = list(" ,=:[]{}()'\"\\$~+-%@|*?!#\t\nab日🙂") + ["${", "${a}", "\\'", "\\${"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(300)]
    parser = OverridesParser.create()
    for text in texts:
        [arg] = cli.quote_free_text(["sample.py", f"prompt={text}"], cli.SAMPLE_TEXT)[1:]
        value = parser.parse_override(arg).value()
        assert OmegaConf.create({"prompt": value}).prompt == text, (text, arg)


def test_hydra_syntax_still_works_around_free_text():
    argv = ["sample.py", "-m", "--cfg", "job", "prompt=a, b", "~out_dir", "+x=1", "seed=1,2", "top_k=${seed}",
            "logger.tags=[x, y z]", "logger.run_name=null", "++prompt=c=d", "-cn", "prompt=not an override"]
    assert cli.quote_free_text(argv, cli.SAMPLE_TEXT) == [
        "sample.py", "-m", "--cfg", "job", "prompt='a, b'", "~out_dir", "+x=1", "seed=1,2", "top_k=${seed}",
        "logger.tags=['x','y z']", "logger.run_name=null", "++prompt='c=d'", "-cn", "prompt=not an override"]
    cfg = compose_sample(["++prompt=x, y", "seed=7", "top_k=${seed}", "logger.tags=a, b c"])
    assert (cfg.prompt, cfg.top_k, list(cfg.logger.tags)) == ("x, y", 7, ["a", "b c"])


def test_paths_and_lists_of_paths(tmp_path):
    """data.path: a path with commas, spaces and `=` is one path; [a, b] is a list of them (inside
    brackets a comma separates items); null stays null."""
    from conftest import compose_train
    odd, spaced = f"{tmp_path}/my corpus, v2=final.txt", f"{tmp_path}/my corpus v2.txt"
    for value, expected in ((odd, odd), (f"[{spaced}, b=1.txt]", [spaced, "b=1.txt"])):
        argv = cli.quote_free_text(["train.py", "data=files", f"data.path={value}"], cli.TRAIN_TEXT)
        assert compose_train(argv[1:]).data.path == expected
    assert compose_train(cli.quote_free_text(["train.py", "data.path=null"], cli.TRAIN_TEXT)[1:]).data.path is None


def test_sample_docstring_form_no_longer_needs_inner_quotes():
    """The shell's quotes are all a user needs; quotes inside the value are part of the text."""
    cfg = compose_sample(["prompt=Où est-il ?"])
    assert cfg.prompt == "Où est-il ?"
    assert compose_sample(["prompt='single'"]).prompt == "'single'"


def test_printed_commands_give_back_what_was_typed():
    """cli.as_typed undoes the quoting for commands printed for pasting (train.py's resume line):
    through a shell they split back into the arguments as typed."""
    import shlex
    typed = ["data.path=/data/my corpus, v2.txt", "logger.run_name=it's ${x}", "logger.tags=[a, b c]",
             "optim.lr=3e-4", "out_dir=/runs/new one"]
    printed = " ".join(cli.as_typed(cli.quote_free_text(["train.py", *typed], cli.TRAIN_TEXT)[1:], cli.TRAIN_TEXT))
    assert shlex.split(printed) == typed


def test_help_offers_only_the_choices_each_entry_point_takes():
    """train.py --help: every config group with its files and no `schema` choice; sample.py --help:
    only the groups it takes (model, logger), with the files that are there."""
    def groups(help_text: str) -> dict[str, list[str]]:
        block = help_text.split("== Configuration groups ==")[1].split("== Config ==")[0]
        return {m[1]: m[2].split("(")[0].replace(",", " ").split()
                for m in re.finditer(r"^(\w+): (.+)$", block, re.M)}

    files = {g: sorted(p.stem for p in (ROOT / "configs" / g).glob("*.yaml"))
             for g in ("data", "experiment", "logger", "model", "optim")}
    r = run_script(["train.py", "--help"])
    assert r.returncode == 0 and groups(r.stdout) == files, r.stdout[:2000]
    r = run_script(["sample.py", "--help"])
    assert r.returncode == 0 and groups(r.stdout) == {g: files[g] for g in ("model", "logger")}, r.stdout[:2000]
