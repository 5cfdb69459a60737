"""Plot a run's loss curves from its metrics.jsonl, or a sweep's jobs side by side (no W&B needed).

    python scripts/plot_metrics.py outputs/2026-01-01/12-00-00            # writes <run_dir>/loss.png
    python scripts/plot_metrics.py <run_dir> --out curve.png --log-y
    python scripts/plot_metrics.py multirun/2026-01-01/12-00-00           # writes <sweep_dir>/loss.png

A run: train loss (every log step, light) and the eval losses on train and val (every eval, bold)
against the step; the learning rate on a second axis. A sweep: every job's val loss, labelled with
the overrides that differ between the jobs. The title names the corpus the run trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's packages
from engine.metrics import read_metrics  # noqa: E402

EVAL_STYLE = dict(lw=2, marker="o", ms=3)
SERIES = (("train/loss", "train loss (step)", dict(alpha=0.35, lw=1)),
          ("train/eval_loss", "train loss (eval)", EVAL_STYLE), ("val/loss", "val loss (eval)", EVAL_STYLE))


def points(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def plot(curves: list[tuple[str, list, dict]], out: Path, ylabel: str, log_y: bool, title: str,
         lr: list | None = None) -> Path:
    """(label, points, style) curves against the step, the learning rate on a second axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, xy, style in curves:
        if xy:
            ax.plot(*zip(*xy, strict=True), label=label, **style)
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr, strict=True), color="grey", ls="--", lw=1, label="lr")
        ax2.set_ylabel("learning rate")
        ax2.legend(loc="center right", fontsize=8)
    ax.set(xlabel="step", ylabel=ylabel, title=title, yscale="log" if log_y else "linear")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def read_sweep(sweep_dir: Path) -> dict[str, list[dict]]:
    """{label: records} of each job of a sweep directory (<sweep>/<num>/metrics.jsonl), labelled with
    the overrides of its .hydra/overrides.yaml that not every job shares."""
    jobs = sorted((p.parent for p in sweep_dir.glob("*/metrics.jsonl")), key=lambda d: (len(d.name), d.name))
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no metrics.jsonl, nor jobs with one: pass a run or sweep "
                                "directory written by train.py")
    overrides = {job: _overrides(job) for job in jobs}
    common = set.intersection(*(set(o) for o in overrides.values()))
    return {f"{job.name}: " + (" ".join(o for o in overrides[job] if o not in common) or "-"): read_metrics(
        job / "metrics.jsonl") for job in jobs}


def _overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"  # a YAML list of strings, which JSON-quoting reads back
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [line[2:].strip() for line in lines if line.startswith("- ")]


def corpus(records: list[dict]) -> str | None:
    """The corpus a run trained on, as its first record says (e.g. "python_stdlib (fallback for ...)")."""
    return next((r["corpus"] for r in records if r.get("corpus")), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (or its metrics.jsonl), or a sweep directory")
    parser.add_argument("--out", type=Path, default=None, help="output PNG (default <run_dir>/loss.png)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    args = parser.parse_args(argv)
    path = args.run_dir
    try:
        if path.is_dir() and not (path / "metrics.jsonl").is_file():
            jobs = read_sweep(path)
            corpora = sorted({c for c in map(corpus, jobs.values()) if c})
            curves = [(label, points(records, "val/loss"), EVAL_STYLE) for label, records in jobs.items()]
            out = plot(curves, args.out or path / "loss.png", "val loss (nats/token)", args.log_y,
                       f"{path} ({', '.join(corpora)})" if corpora else str(path))
        else:
            run_dir = path if path.is_dir() else path.parent
            file = run_dir / "metrics.jsonl" if path.is_dir() else path
            if not file.is_file():
                raise FileNotFoundError(f"{file} does not exist: pass a run directory written by train.py")
            records = read_metrics(file)  # a line cut short by a kill is dropped with a warning
            name = corpus(records)
            curves = [(label, points(records, key), style) for key, label, style in SERIES]
            out = plot(curves, args.out or run_dir / "loss.png", "cross-entropy loss (nats/token)", args.log_y,
                       f"{run_dir} ({name})" if name else str(run_dir), lr=points(records, "opt/lr"))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
