"""Progress of a run, both ways a user watches it.

In a terminal: one bar over the run's steps (`step 120/400`, loss, s/step, ETA), replacing
Lightning's epoch bar, which counts nothing useful here (the loader streams and the run is
bounded by steps, so it shows `Epoch 1/-2`). With the output sent to a file (a cluster log,
`nohup`): a line every `every` steps, and at least every `seconds` seconds, with the same
figures, so a log shows that training moves and when it will end. Printed on rank 0 only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
from tqdm.auto import tqdm

from distill.distributed import is_rank_zero


def duration(seconds: float) -> str:
    """`95` -> `1m35s`, `4000` -> `1h06m`."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StepProgress(pl.Callback):
    """A step bar in a terminal, or a status line every few steps in a log file.

    Args:
        every: Steps between log lines (not in a terminal).
        seconds: At most this long between log lines.
        terminal: Force the bar (True) or the lines (False); default: whether stderr is a TTY.
    """

    def __init__(self, *, every: int = 25, seconds: float = 30.0, terminal: bool | None = None) -> None:
        self.every, self.seconds = every, seconds
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar: Any = None
        self.start = self.last_line = 0.0
        self.first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.last_line = time.perf_counter()
        self.first_step = trainer.global_step
        if self.terminal and is_rank_zero():
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step",
                            dynamic_ncols=True, leave=True)  # fmt: skip

    def status(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Step, total, loss, seconds per step and the time left."""
        done = trainer.global_step - self.first_step
        per_step = (time.perf_counter() - self.start) / done if done else float("nan")
        loss = trainer.callback_metrics.get("train/loss")
        left = (trainer.max_steps - trainer.global_step) * per_step if done else float("nan")
        return {"step": trainer.global_step, "total": trainer.max_steps, "per_step": per_step, "left": left,
                "loss": float(loss) if loss is not None else float("nan")}  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not is_rank_zero():
            return
        s = self.status(trainer)
        if self.bar is not None:
            self.bar.n = s["step"]
            self.bar.set_postfix_str(f"loss {s['loss']:.3f}", refresh=False)
            self.bar.refresh()
            return
        now = time.perf_counter()
        due = s["step"] % self.every == 0 and now - self.last_line >= 2.0  # not twice in a row
        if due or now - self.last_line >= self.seconds or s["step"] == s["total"]:
            self.last_line = now
            print(f"step {s['step']}/{s['total']}  loss {s['loss']:.4f}  {s['per_step']:.2f} s/step  "
                  f"ETA {duration(s['left'])}", flush=True)  # fmt: skip

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif is_rank_zero() and trainer.global_step > self.first_step:
            s = self.status(trainer)
            print(f"trained {trainer.global_step - self.first_step} steps in "
                  f"{duration(time.perf_counter() - self.start)} ({s['per_step']:.2f} s/step)", flush=True)  # fmt: skip


class CountProgress:
    """Progress over a count (images encoded, shards built): a bar in a terminal, else a line
    every `seconds` seconds with done/total, rate and ETA, so a cluster log shows it moving.
    Shown on rank 0 only.

    Args:
        desc: What is counted, e.g. `cache: teacher images`.
        total: The count at the end, if known.
        unit: The unit's name in the lines.
        seconds: Between log lines.
    """

    def __init__(self, desc: str, total: int | None, unit: str, *, seconds: float = 30.0) -> None:
        self.desc, self.total, self.unit, self.seconds = desc, total, unit, seconds
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()
        shown = is_rank_zero()
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not shown) if shown and sys.stderr.isatty() else None
        self.lines = shown and self.bar is None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.perf_counter() - self.last >= self.seconds:
            self.last = time.perf_counter()
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        eta = f", ETA {duration((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
        return f"{self.desc}: {self.done}{of} {self.unit}s, {rate:.1f} {self.unit}s/s, {duration(elapsed)} elapsed{eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
