"""A `+key=value` that no schema has is refused in one line naming the closest real setting (Hydra's
own hint after a typo is to add a +, which would train with the typo saved and unused); Hydra's
hydra.* keys and config groups keep working."""

from __future__ import annotations

import pytest
from conftest import run_script

import cli
from engine.config import TrainConfig


def test_an_unknown_added_key_names_the_closest_setting():
    with pytest.raises(ValueError, match=r"^\+max_iter=10: no setting is called max_iter; did you mean "
                                         r"max_iters\? \(a setting that exists is set without \+: max_iters=10\)"):
        cli.check_added_keys(["model.n_layer=2", "+max_iter=10"], TrainConfig, cli.CONFIG_DIR)
    with pytest.raises(ValueError, match=r"did you mean model\.n_layer\?"):
        cli.check_added_keys(["++model.n_layers=3"], TrainConfig, cli.CONFIG_DIR)
    with pytest.raises(ValueError, match=r"no setting is called zzz; `python <script>.py --cfg job`"):
        cli.check_added_keys(["+zzz=1"], TrainConfig, cli.CONFIG_DIR)
    # Hydra's own keys, config groups and settings that exist pass (the last: Hydra says it exists).
    cli.check_added_keys(["+hydra.job.env_set.X=1", "+experiment=shakespeare_char_cpu", "+optim=muon",
                          "+max_iters=3", "max_iter=3"], TrainConfig, cli.CONFIG_DIR)


def test_on_the_command_line_it_is_one_line_and_exit_2(tmp_path):
    r = run_script(["train.py", "+max_iter=10", "logger=none", f"out_dir={tmp_path / 'run'}"], timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: +max_iter=10: no setting is called max_iter; "
                                                         "did you mean max_iters?")
    assert not (tmp_path / "run").exists()
    r = run_script(["sample.py", "+prompts=hi"], timeout=60)
    assert r.returncode == 2 and "did you mean prompt?" in r.stderr.strip().splitlines()[-1]
