"""Progress of long work (tokenizing a corpus, a whole-split eval) that never floods a log file.

On a terminal, a tqdm bar. Elsewhere (a batch job, `> log`), where its carriage returns would fill
the file, a log line every `every_s` seconds says how far the work got and, with a known total, how
long is left; work that ends sooner writes nothing, work that wrote one writes a last one.

    with Progress("tokenizing train", total=n_chars, unit="chars") as p:
        for piece in pieces:
            p.update(len(piece))          # how much more is done
"""

from __future__ import annotations

import logging
import shutil
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EVERY_S = 30.0  # seconds between two log lines outside a terminal


def _num(n: float) -> str:
    """1234567 -> '1.23M'; below a thousand, the integer."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


class Progress:
    """desc: what is being done; total: the amount when known (None: a count without an ETA);
    enabled=False: silent (e.g. every rank but 0); every_s: seconds between log lines (default EVERY_S)."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "items", enabled: bool = True,
                 every_s: float | None = None, logger: logging.Logger | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.log = logger or log
        self.every_s = EVERY_S if every_s is None else every_s
        self.enabled = enabled and total != 0
        self.done = 0.0  # units done
        self.lines = 0  # log lines written
        self.bar = None
        self.start = time.perf_counter()
        self.next_line = self.start + self.every_s

        if self.enabled and sys.stderr.isatty():
            # Counts of a few dozen (eval batches) read "3/20 batches [00:01<00:04]", not "3.00/20.0 ?batches/s";
            # a terminal that reports 0 columns or rows gets 80 x 24, where tqdm would draw nothing.
            small = total is not None and total < 1000
            size = shutil.get_terminal_size((0, 0))
            known = size.columns > 0 and size.lines > 0
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=not small, leave=False, file=sys.stderr,
                            dynamic_ncols=known, ncols=None if known else 80, nrows=None if known else 24,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]" if small else None)

    def update(self, n: float = 1) -> None:
        """n more units done."""
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now >= self.next_line:
            self.log.info("%s: %s", self.desc, self._status(now))
            self.lines += 1
            self.next_line = now + self.every_s

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        if self.total:
            left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            return (f"{_num(self.done)}/{_num(self.total)} {self.unit} ({100 * self.done / self.total:.0f} %), "
                    f"{elapsed:.0f} s, about {left:.0f} s left")
        return f"{_num(self.done)} {self.unit}, {elapsed:.0f} s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.lines:
            self.log.info("%s: %s %s in %.0f s", self.desc, _num(self.done), self.unit, time.perf_counter() - self.start)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
