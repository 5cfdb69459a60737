"""Checkpoints: atomic writes, safe (weights_only) reads, clear errors naming the file; junk, cut-short
and bit-flipped files, weights that do not fit their config, full disks, leftovers of killed saves."""

import copy
import errno
import io
import os
import pickle
import random
import re
import stat
import zipfile

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    candidates,
    link_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    open_checkpoint,
    remove_leftovers,
    resolve_checkpoint,
    save_checkpoint,
    step_checkpoints,
    step_name,
)
from engine.config import OptimConfig
from engine.optim import build_optimizer
from engine.parallel import unwrap_model
from engine.state import _parts, load_named_states, named_states
from model import GPT, ModelConfig


def tiny(pos="learned"):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=23, block_size=8, n_layer=1, n_head=2, n_embd=16, pos=pos))


def payload(model, **extra):
    return {"model": model.state_dict(), "model_config": model.config.to_dict(), **extra}


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_round_trip_rebuilds_the_same_model(tmp_path, pos):
    model = tiny(pos)
    save_checkpoint(tmp_path / "last.pt", payload(model, step=7, tokenizer='{"kind": "char"}'))
    ckpt = load_checkpoint(tmp_path)  # a run directory resolves to its checkpoint
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["step"] == 7
    again = model_from_checkpoint(ckpt)
    assert again.lm_head.weight is again.wte.weight
    idx = torch.randint(0, 23, (2, 8))
    assert torch.equal(model(idx)[0], again(idx)[0])


def test_run_directory_order_is_last_then_step_files_newest_first_then_best(tmp_path, caplog):
    model = tiny()
    save_checkpoint(tmp_path / "best.pt", payload(model, step=3))
    assert resolve_checkpoint(tmp_path) == tmp_path / "best.pt"
    for step in (4, 6):
        save_checkpoint(tmp_path / f"ckpt-00000{step}.pt", payload(model, step=step))
    assert candidates(tmp_path) == [tmp_path / "ckpt-000006.pt", tmp_path / "ckpt-000004.pt", tmp_path / "best.pt"]
    assert load_checkpoint(tmp_path)["step"] == 6  # a run dir of step files only is a run dir
    save_checkpoint(tmp_path / "last.pt", payload(model, step=7), keep_last=3)  # ckpt-000007.pt: a hard link
    assert candidates(tmp_path)[:2] == [tmp_path / "last.pt", tmp_path / "ckpt-000006.pt"]
    (tmp_path / "last.pt").write_bytes(b"junk")  # in place: ckpt-000007.pt, the same file, is junk too
    assert open_checkpoint(tmp_path)[0] == tmp_path / "ckpt-000006.pt"
    assert "skipping" in caplog.text and "last.pt" in caplog.text


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    path = save_checkpoint(tmp_path / "last.pt", payload(model, step=1))

    def explode(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, payload(model, step=2))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_corrupt_missing_and_foreign_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pt.*corrupt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in directory"):
        load_checkpoint(tmp_path / "..")
    torch.save({"model": {}, "model_config": {}, "format_version": 999}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 999"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a causalgpt checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class Evil:
    """Any class: unpickling it could run code, so weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {}, "model_config": {}, "format_version": FORMAT_VERSION, "x": Evil()},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")


def test_unwrap_removes_the_compile_wrapper():
    model = tiny()
    assert unwrap_model(torch.compile(model)) is model


def test_overrides_change_how_the_model_runs_not_its_weights(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "m.pt", payload(model))
    leaky = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"), causal=False, attn="explicit")
    assert not leaky.config.causal
    assert torch.equal(leaky.wte.weight, model.wte.weight)


# ---- faults: junk, cut-short and damaged files, full disks, leftovers of killed saves -----------------
def _zip_of_a_text_file() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "hello")
    return buf.getvalue()


def _flipped(data: bytes) -> bytes:
    """One byte of the weights inverted: torch.load reads it silently; the CRC check does not."""
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


JUNK = {  # name -> (bytes from the real checkpoint's bytes, the exception torch.load itself raises)
    "empty": (lambda real: b"", "EOFError"),
    "five bytes": (lambda real: b"\x80\x02]q\x00(K", "IndexError"),  # the unpickler's own failure
    "text": (lambda real: b"not a checkpoint", "UnpicklingError"),
    "random 4 KiB": (lambda real: random.Random(0).randbytes(4096), "UnpicklingError"),
    "a zip of a text file": (lambda real: _zip_of_a_text_file(), "RuntimeError"),
    "a plain pickle": (lambda real: pickle.dumps({"model": 1}, protocol=2), "RuntimeError"),
    "cut at 10 bytes": (lambda real: real[:10], "RuntimeError"),
    "cut at 1000 bytes": (lambda real: real[:1000], "RuntimeError"),
    "cut in half": (lambda real: real[: len(real) // 2], "OSError"),
    "cut by one byte": (lambda real: real[:-1], "OSError"),
    "a flipped byte": (_flipped, None),  # loads without error in torch.load
}


@pytest.mark.parametrize("name", list(JUNK))
def test_junk_cut_short_and_damaged_files_are_one_checkpoint_error(tmp_path, name):
    real = save_checkpoint(tmp_path / "real.pt", payload(tiny(), step=3)).read_bytes()
    make, torch_error = JUNK[name]
    bad = tmp_path / "last.pt"
    bad.write_bytes(make(real))
    if torch_error:  # what a bare torch.load does with it: many types, not one
        with pytest.raises(Exception) as raw:
            torch.load(bad, weights_only=True)
        assert type(raw.value).__name__ == torch_error
    else:
        torch.load(bad, weights_only=True)
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(bad))} .*corrupt") as e:
        load_checkpoint(bad)
    assert "\n" not in str(e.value)


def test_weights_that_do_not_fit_their_model_config_are_refused(tmp_path):
    model = tiny()
    sd = dict(model.state_dict())
    sd["wte.weight"] = torch.zeros(5, 16)
    save_checkpoint(tmp_path / "shape.pt", {"model": sd, "model_config": model.config.to_dict()})
    with pytest.raises(CheckpointError, match=r"shape.pt: its weights do not match its model_config \(wte.weight "
                                              r"has shape \[5, 16\], its model_config gives \[23, 16\]\)"):
        load_checkpoint(tmp_path / "shape.pt")
    sd = dict(model.state_dict())
    del sd["h.0.attn.c_proj.weight"]
    save_checkpoint(tmp_path / "missing.pt", {"model": sd, "model_config": model.config.to_dict()})
    with pytest.raises(CheckpointError, match=r"\(h.0.attn.c_proj.weight is missing\)"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "config.pt", {"model": sd, "model_config": {"n_layer": "many"}})
    with pytest.raises(CheckpointError, match="config.pt has an invalid model_config"):
        load_checkpoint(tmp_path / "config.pt")


class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes and then fails every write with errno, as a full disk does."""

    def __init__(self, f, room: int, err: int) -> None:
        self.f, self.room, self.err = f, room, err

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(self.err, os.strerror(self.err))
        self.room -= len(b)
        return self.f.write(b)


@pytest.mark.parametrize(("where", "err"), [("write", errno.ENOSPC), ("fsync", errno.EDQUOT),
                                            ("write", errno.EROFS)])
def test_a_disk_error_during_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, err):
    model = tiny()
    path = save_checkpoint(tmp_path / "last.pt", payload(model, step=1))
    if where == "write":  # the real torch.save, writing into a file that runs out of room
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, **kw: real_save(obj, FullDisk(f, 2000, err), **kw))
    else:  # delayed allocation: the write succeeds, the flush to disk does not
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(err, os.strerror(err))
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint {re.escape(str(path))}: "
                                              rf"{os.strerror(err)} \({errno.errorcode[err]}\); the previous "
                                              r"last.pt, if any, is intact") as e:
        save_checkpoint(path, payload(model, step=2))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temporary file is gone


def test_step_link_shares_the_file_or_copies_it_and_leftovers_are_found(tmp_path, monkeypatch):
    last = save_checkpoint(tmp_path / "last.pt", payload(tiny(), step=4))
    linked = link_checkpoint(last, tmp_path / step_name(4))
    assert linked.name == "ckpt-000004.pt" and os.path.samefile(linked, last)  # a hard link: no disk used

    def no_links(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    monkeypatch.setattr(os, "link", no_links)  # a file system without hard links: an atomic copy
    copied = link_checkpoint(last, tmp_path / step_name(5))
    assert not os.path.samefile(copied, last) and copied.read_bytes() == last.read_bytes()
    assert [s for s, _ in step_checkpoints(tmp_path)] == [5, 4]

    killed = [".last.pt.tmp-1a2b3c4d", ".best.pt.tmp-00ff00ff", ".ckpt-000006.pt.tmp-link",
              ".last.pt.k2j3h4g5.tmp"]  # the last: a save killed under an earlier version
    for name in [*killed, ".keep-me", "notes.tmp", ".other.pt.tmp-12345678"]:
        (tmp_path / name).write_bytes(b"partial")
    assert [p.name for p in remove_leftovers(tmp_path)] == sorted(killed)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".keep-me",
                                                                                   ".other.pt.tmp-12345678"]


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_one_process_names_its_states_as_torch_distributed_checkpoint_does(optim):
    """named_states on one process (no DCP: its helpers import the compiler) gives DCP's full state
    dicts exactly, and load_named_states puts them back: the next step is bit-identical on both paths."""
    def model_and_parts(steps):
        model = tiny()
        parts = _parts(build_optimizer(model, OptimConfig(name=optim), "cpu"))
        x = torch.randint(0, 23, (2, 8), generator=torch.Generator().manual_seed(1))
        for _ in range(steps):
            model(x, x)[1].backward()
            for opt in parts.values():
                opt.step()
                opt.zero_grad()
        return model, parts, x

    model, parts, x = model_and_parts(2)
    ours_model, ours_optim = named_states(model, parts, distributed=False)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    dcp_model = get_model_state_dict(model, options=full)
    dcp_optim = {n: get_optimizer_state_dict(model, opt, options=full) for n, opt in parts.items()}
    assert ours_model.keys() == dcp_model.keys() and all(torch.equal(ours_model[k], dcp_model[k]) for k in dcp_model)
    for name, dcp in dcp_optim.items():
        assert ours_optim[name]["param_groups"] == dcp["param_groups"]
        assert ours_optim[name]["state"].keys() == dcp["state"].keys()
        for fqn, state in dcp["state"].items():
            assert all(torch.equal(ours_optim[name]["state"][fqn][k], v) for k, v in state.items())
    after = []
    for distributed in (False, True):  # back into a fresh model and optimizer, then one more step
        fresh, fresh_parts, _ = model_and_parts(0)
        saved = copy.deepcopy((ours_model, ours_optim))  # as read from a file: no tensor shared with the live run
        load_named_states(fresh, fresh_parts, *saved, distributed)
        fresh(x, x)[1].backward()
        for opt in fresh_parts.values():
            opt.step()
        after.append(fresh.state_dict())
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])
    assert not all(torch.equal(after[0][k], ours_model[k]) for k in after[0])  # the step changed the weights
