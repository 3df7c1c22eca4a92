"""Stopping early and safely: preemption signals, non-finite steps, and the agreement of every
rank on both.

SIGTERM or SIGUSR1 (preemption; Slurm's warning before the time limit) only raise a flag; at the
next step boundary all ranks agree through one tiny all-reduce (`stop_on_any_rank`), write a
checkpoint and stop. A step whose loss or gradients are NaN/Inf on any rank is skipped on every
rank (`finite_on_every_rank`) and counted; `NonFiniteGuard` stops the run after too many in a
row.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch

from pretrain.distributed import sum_across_processes


class NonFiniteLossError(RuntimeError):
    """train.max_nonfinite_steps steps in a row had NaN/Inf losses or gradients (one line)."""


class StopSignals:
    """SIGTERM and SIGUSR1 only note that a stop was asked for; the loop stops at the next step
    boundary. Installed from the main thread only, the previous handlers restored on exit.
    The loader's worker processes ignore both (see stop_signals_blocked)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame) -> None:
        self.received = signal.Signals(number).name


@contextlib.contextmanager
def stop_signals_blocked():
    """SIGTERM and SIGUSR1 wait while this block runs (and are handled after it); processes
    forked meanwhile (DataLoader workers) keep them blocked for life. Launchers and Slurm signal
    every process of a job, and torch's loader workers die of SIGTERM, which would crash the
    training process instead of letting it checkpoint and stop. SIGKILL still ends a worker."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_on_any_rank(
    accelerator, stop_signals: StopSignals, out_of_time: bool
) -> tuple[str | None, bool]:
    """The same answer on every rank, from one tiny all-reduce: (the stop signal if any rank
    got one, else None; whether the main process's clock says the time limit is reached)."""
    flags = torch.tensor(
        [int(stop_signals.received is not None), int(out_of_time and accelerator.is_main_process)],
        device=accelerator.device,
    )
    signalled, timed_out = sum_across_processes(accelerator, flags).tolist()
    if signalled:
        return stop_signals.received or "a signal to another rank", False
    return None, timed_out > 0


def finite_on_every_rank(accelerator, *values) -> bool:
    """Whether every rank's values are all finite: one tiny all-reduce, and the host waits."""
    checks = [torch.isfinite(torch.as_tensor(v, device=accelerator.device)).all() for v in values]
    nonfinite = (~torch.stack(checks).all()).to(torch.int64).reshape(1)
    return sum_across_processes(accelerator, nonfinite).item() == 0


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; raises NonFiniteLossError after `limit` in a row
    (0: never)."""

    def __init__(self, limit: int, total_before: int = 0):
        self.limit = limit
        self.total = total_before  # over the whole run, resumed ones included
        self.in_a_row = 0

    def record(self, step_is_finite: bool, done: int) -> None:
        """After optimizer step `done` (1-based)."""
        self.in_a_row = 0 if step_is_finite else self.in_a_row + 1
        if step_is_finite:
            return
        self.total += 1
        if self.limit and self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} steps in a row had NaN/Inf losses or gradients (steps "
                f"{done - self.in_a_row + 1}-{done}, none applied): lower the learning rate, "
                "set train.clip_grad, or check the data"
            )
