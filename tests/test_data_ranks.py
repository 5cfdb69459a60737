"""prepare() called by several processes at once, as every rank of a torchrun job does: exactly one
builds, the others wait on the file lock (no collective, no timeout) saying what they wait for,
and all return the same directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import names_besides_locks

REPO = Path(__file__).resolve().parent.parent

# One rank: wait until every rank is ready (so they really arrive together), then prepare, with a
# build slowed down enough for the others to find the lock taken.
RANK = """
import logging, sys, time
from pathlib import Path
import data.atomic as atomic
import data.prepare as prep
from data.config import DataConfig

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
atomic.LOCK_POLL_S, atomic.LOCK_LOG_EVERY_S = 0.05, 0.25
real_build = prep._build

def slow_build(*args):
    print("BUILD", file=sys.stderr, flush=True)
    time.sleep(1.0)
    return real_build(*args)

prep._build = slow_build
ready, world, rank, corpus, cache = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
(ready / rank).touch()
deadline = time.monotonic() + 60
while len(list(ready.iterdir())) < world and time.monotonic() < deadline:
    time.sleep(0.01)
print(prep.prepare(DataConfig(source="files", path=corpus, cache_dir=cache), progress=rank == "0"))
"""


def test_all_ranks_prepare_at_once_one_builds_all_get_the_directory(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i} shall I compare thee to a summer's day?\n" for i in range(3000)))
    ready = tmp_path / "ready"
    ready.mkdir()
    world = 3
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(ready), str(world), str(r), str(corpus),
                               str(tmp_path / "cache")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0] * world, [err for _, err in results]
    dirs = {Path(out.strip().splitlines()[-1]) for out, _ in results}
    assert len(dirs) == 1
    (prepared,) = dirs
    logs = [err for _, err in results]
    assert sum(err.count("BUILD") for err in logs) == 1
    assert sum(f"prepared {prepared}" in err for err in logs) == 1
    waiting = [line for err in logs for line in err.splitlines() if "waiting for another process preparing" in line]
    assert waiting and all(str(prepared) in line and "MB written so far" in line for line in waiting)
    assert sum("prepared by another process" in err for err in logs) == world - 1
    assert names_besides_locks(prepared.parent) == [prepared.name]
    assert "Traceback" not in "".join(logs)
