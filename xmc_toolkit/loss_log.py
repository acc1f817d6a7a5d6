"""Per-step training losses summed on the device and read on the host only when asked.

A training step must not wait on the host (on CUDA, ``float(loss)`` is a synchronisation).
:class:`LossLog` keeps the running sum of the step losses and the step, epoch and value of the
first non-finite one as device tensors; :meth:`LossLog.read` copies them to the host in one
transfer (every ``--log-every`` steps, before a sampler refresh or checkpoint, at epoch ends)
and raises on a NaN/inf loss, naming its step. Both the single-process and the sharded trainer
use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import XMCError

__all__ = ["LossLog"]


class LossLog:
    """Device-side accumulator of step losses (one host copy per :meth:`read`)."""

    def __init__(self) -> None:
        self.acc: torch.Tensor | None = None  # [] float64 sum since the last read
        self.bad: torch.Tensor | None = None  # [] bool: a non-finite loss was seen
        self.info: torch.Tensor | None = None  # [3] float64 its step, epoch, value
        self.n = 0  # steps in acc
        self.epoch_sum = 0.0  # sum of every loss read since the caller last reset it

    def add(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        """Add a step's scalar ``loss`` (device work only; remembers the first NaN/inf)."""
        value = loss.detach().double()  # []
        if self.acc is None:
            self.acc = torch.zeros((), dtype=torch.float64, device=value.device)
            self.bad = torch.zeros((), dtype=torch.bool, device=value.device)
            self.info = torch.zeros(3, dtype=torch.float64, device=value.device)
        self.acc += value
        self.n += 1
        new = ~torch.isfinite(value) & ~self.bad  # [] first non-finite loss
        info = torch.stack([value.new_full((), step), value.new_full((), epoch), value])
        self.info = torch.where(new, info, self.info)
        self.bad |= new

    def read(self, where: Callable[[], str] | None = None) -> tuple[float, float] | None:
        """``(mean, sum)`` of the losses since the last read, or ``None`` if there were none.

        Args:
            where: called only on a NaN/inf loss; its text is appended to the error message
                (e.g. which checkpoint is kept).

        Raises:
            XMCError: a loss since the last read was NaN/inf (names the first such step).
        """
        if self.acc is None or self.bad is None or self.info is None:
            return None
        total, bad, step, epoch, value = torch.cat(  # one device-to-host copy
            [self.acc.view(1), self.bad.double().view(1), self.info]).tolist()
        n, self.acc, self.n = self.n, None, 0
        if bad:
            raise XMCError(
                f"loss became {value} at step {int(step)} (epoch {int(epoch)})"
                f"{where() if where is not None else ''}; lower "
                "--lr, set --clip-grad, or check the data for extreme values")
        self.epoch_sum += total
        return total / max(n, 1), total
