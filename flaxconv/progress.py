"""Keras-style progress output of :func:`flaxconv.fit`: a bar within each epoch (a
terminal, or a widget in Jupyter/Colab through ``tqdm.auto``) and one line per epoch."""

from __future__ import annotations

import sys

__all__ = ["Progress", "resolve_verbose"]


class Progress:
    """Keras-style output: a bar within the epoch (terminals) and one line per epoch."""

    def __init__(self, verbose: str, epochs: int, steps: int | None):
        self.verbose, self.epochs, self.steps = verbose, epochs, steps
        self.bar = None

    def begin(self, epoch: int) -> None:
        if self.verbose == "silent":
            return
        print(f"Epoch {epoch + 1}/{self.epochs}", flush=True)
        if self.verbose == "bar":
            # tqdm.auto: a widget bar in Jupyter/Colab (text where ipywidgets is missing).
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.steps, file=sys.stdout, leave=False, dynamic_ncols=True,
                bar_format="{n_fmt}/{total_fmt} {bar} {elapsed} {rate_fmt}",
                unit="step", ascii=" ━",
            )

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def end(self, steps: int, seconds: float, logs: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.verbose == "silent":
            return
        numbers = " - ".join(
            f"{k}: {v:.4f}" for k, v in logs.items() if k not in ("epoch_seconds", "lr")
        )
        ms = 1000.0 * seconds / max(steps, 1)
        print(f"{steps}/{steps} - {seconds:.1f}s - {ms:.1f}ms/step - {numbers}", flush=True)


def resolve_verbose(verbose: str | int) -> str:
    if verbose == "auto":
        # A Jupyter kernel's stdout is no tty, yet shows a bar as a terminal does.
        interactive = sys.stdout.isatty() or "ipykernel" in sys.modules
        return "bar" if interactive else "epoch"
    aliases = {0: "silent", 1: "bar", 2: "epoch"}
    verbose = aliases.get(verbose, verbose)
    if verbose not in ("bar", "epoch", "silent"):
        raise ValueError(f"verbose={verbose!r}; expected 'auto', 'bar', 'epoch' or 'silent'")
    return verbose
