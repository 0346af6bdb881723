"""The command line's progress on stderr: the whole run's UNet evaluations with its ETA, each scale's steps, each
decode's tiles."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(nested: bool = False, **kwargs) -> tqdm:
    # in a terminal, live bars one under the other; in a log (CI, a pipe) only the outer ones, a line every half
    # minute, as nested bars there are cursor-movement garbage
    tty = sys.stderr.isatty()
    if nested and not tty:
        kwargs["disable"] = True
    return tqdm(**kwargs, file=sys.stderr, dynamic_ncols=True, mininterval=0.1 if tty else 30,
                position=(1 if nested else 0) if tty else None)


class Progress:
    """The whole run's UNet evaluations with its ETA, each scale's steps (its bar appearing as the scale begins),
    each decode's tiles. Quiet where `shown` is False (ranks other than 0)."""

    def __init__(self, total_evals: int, n_scales: int, shown: bool):
        self.shown, self.n_scales = shown, n_scales
        self.overall = bar(total=total_evals, desc="all", unit="eval", disable=not shown)
        self.bar: tqdm | None = None
        self.decoding = False
        self.evals = 0

    def step(self, scale: int, step: int, steps: int, evals: int) -> None:
        if step == 0:  # a scale begins
            self._close()
            self.bar = bar(True, total=steps, desc=f"scale {scale}/{self.n_scales}", unit="step",
                           disable=not self.shown, leave=False)
            self.decoding, self.evals = False, 0
            return
        self.overall.update(evals - self.evals)
        self.evals = evals
        self.bar.update(step - self.bar.n)

    def tile(self, done: int, total: int) -> None:
        if not self.decoding:
            self._close()
            self.bar = bar(True, total=total, desc="VAE decode", unit="tile", disable=not self.shown,
                           leave=False)
            self.decoding = True
        self.bar.update(done - self.bar.n)

    def write(self, text: str) -> None:
        if self.shown:
            tqdm.write(text, file=sys.stderr)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close()
        self.overall.close()
