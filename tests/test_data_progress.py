"""Progress outside a terminal: log lines with the amount done, the total and the time left, never a
tqdm bar's carriage returns; and preparing a corpus whose size is known reports against that size."""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys

import pytest

import data.progress
from data.config import DataConfig
from data.prepare import prepare
from data.progress import Progress


def test_log_lines_say_how_far_and_how_long_is_left(caplog, capsys):
    caplog.set_level(logging.INFO)
    with Progress("tokenizing train", total=4000, unit="chars", every_s=0.0) as p:
        for _ in range(4):
            p.update(1000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("tokenizing train: 1.00k/4.00k chars (25 %)") and "s left" in lines[0]
    assert lines[-1].startswith("tokenizing train: 4.00k chars in")
    assert "\r" not in capsys.readouterr().err  # no bar: stderr is not a terminal here


def test_quick_work_writes_nothing_and_unknown_totals_count(caplog):
    caplog.set_level(logging.INFO)
    with Progress("quick", total=10) as p:  # the default 30 s never pass
        p.update(10)
    assert not caplog.records
    with Progress("stream", total=None, unit="tokens", every_s=0.0) as p:
        p.update(2_500_000)
    assert caplog.records[0].getMessage().startswith("stream: 2.50M tokens, ")


def test_preparing_a_file_reports_characters_of_its_known_size(corpus, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(data.progress, "EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    prepare(DataConfig(name="p", source="files", path=str(corpus), cache_dir=str(tmp_path)), progress=True)
    n_train = int(len(corpus.read_text(encoding="utf-8")) * 0.9)  # the 90/10 split of a text corpus
    train_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing train:")]
    assert f"/{n_train / 1e3:.2f}k chars (" in train_lines[0] and "s left" in train_lines[0], train_lines
    assert train_lines[-1].startswith(f"tokenizing train: {n_train / 1e3:.2f}k chars in"), train_lines


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("columns", "lines"), [(0, 0), (100, 30)])
def test_a_terminal_gets_a_bar_in_whole_counts_even_at_0_columns(monkeypatch, columns, lines):
    """On a terminal: a bar, also where it reports 0 columns and rows (tqdm alone draws nothing there), and an
    eval's few dozen batches read as whole numbers with no "?batches/s"."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((columns, lines)))
    with Progress("eval val", total=20, unit="batches") as p:
        p.update(3)
        p.bar.refresh()
        shown = term.getvalue().split("\r")[-1]
    assert "eval val" in shown and "3/20" in shown and "3.00" not in shown and "?batches/s" not in shown
    assert "|" in shown and len(shown.strip()) <= (columns or 80)
