"""Plot a run's loss curves from its metrics.jsonl (no W&B needed).

    python scripts/plot_metrics.py outputs/2026-01-01/12-00-00            # writes <run_dir>/loss.png
    python scripts/plot_metrics.py <run_dir> --out curve.png --log-y

Train loss (every log step, light) and the eval losses on train and val (every eval, bold) against
the step; the learning rate on a second axis.
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

SERIES = (("train/loss", "train loss (step)", dict(alpha=0.35, lw=1)),
          ("train/eval_loss", "train loss (eval)", dict(lw=2, marker="o", ms=3)),
          ("val/loss", "val loss (eval)", dict(lw=2, marker="o", ms=3)))


def plot(records: list[dict], out: Path, log_y: bool = False, title: str | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for key, label, style in SERIES:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, **style)
    lrs = [(r["step"], r["opt/lr"]) for r in records if r.get("opt/lr") is not None]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs, strict=True), color="grey", ls="--", lw=1, label="lr")
        ax2.set_ylabel("learning rate")
        ax2.legend(loc="center right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title or "loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (or its metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output PNG (default <run_dir>/loss.png)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    args = parser.parse_args(argv)
    run_dir = args.run_dir if args.run_dir.is_dir() else args.run_dir.parent
    path = run_dir / "metrics.jsonl" if args.run_dir.is_dir() else args.run_dir
    if not path.is_file():
        print(f"error: {path} does not exist: pass a run directory written by train.py", file=sys.stderr)
        return 2
    # A line cut short by a kill is dropped with a warning (read_metrics).
    out = plot(read_metrics(path), args.out or run_dir / "loss.png", args.log_y, title=str(run_dir))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
