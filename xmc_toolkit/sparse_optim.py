"""A row-wise Adam for sparse (``nn.Embedding(sparse=True)``) gradients, faster than SparseAdam.

``torch.optim.SparseAdam`` builds several sparse tensors per step and re-coalesces them; with the
10^5 rows a per-query sampled step touches (B = 256 queries x M = 1024 negatives) that dominated
the whole training step. :class:`RowAdam` does the same update with dense row gathers and
scatters over the touched rows only: ``index_select`` the moments of the ``U`` touched rows, update
them, ``index_copy_`` them back and ``index_add_`` the step into the parameter, a cache-sized chunk
of rows at a time (:func:`_row_adam_chunked_`: no ``[U, d]`` temporaries). Rows not in the
gradient are left untouched (their moments are not decayed), exactly as in SparseAdam, and the
numbers equal SparseAdam's (tested). A gradient whose rows are already sorted and distinct (the
label table's per-query scores on the CPU build it so, see ``output_layer``) is not coalesced
again.

Coalescing a sparse gradient gives a tensor whose size (the number ``U`` of distinct rows) depends
on the data, so on CUDA it waits for the device. On CUDA parameters :class:`RowAdam` therefore
uses :func:`_sparse_row_adam_`, which works on the ``N`` uncoalesced rows with static sizes only
(sort, segment sums, masked ``index_add_``) and never synchronises; on the CPU it keeps the
coalescing path (its numbers are the reference the checkpoint-resume and parity tests pin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.autograd.graph import increment_version

from .errors import ConfigError
from .native import kernels, kernels_for, native_status

__all__ = ["RowAdam"]


def _sparse_row_adam_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    row_wise: bool = False,
) -> None:
    """One SparseAdam row update from an *uncoalesced* row gradient, with no host sync.

    Every intermediate has a size known before the kernels run (``N``, the number of gradient
    entries, duplicates included), so nothing is read back from the device. The ``N`` entries
    are sorted by row; the first entry of each run of equal rows opens a segment; the
    ``U <= N`` segment sums land in positions ``0..U-1`` of ``[N, ...]`` buffers, positions
    ``>= U`` are padding (row 0, zero gradient). The moment and parameter updates are written
    with ``index_add_`` of deltas that are zero on padding, so a padding entry aliasing a real
    row 0 adds nothing. Numerically this is SparseAdam's update (``m += (1 - beta1) (g - m)``,
    ``v += (1 - beta2) (g^2 - v)``, ``p -= step_size * m / (sqrt(v) + eps)``) up to the order
    of the duplicate sums.

    Args:
        param: ``[R, ...]`` parameter, updated in place.
        exp_avg: ``[R, ...]`` first moments, updated in place on the touched rows.
        exp_avg_sq: ``[R, ...]`` second moments, updated in place on the touched rows.
        rows: ``[N]`` int64 row of each gradient entry (may repeat, any order).
        values: ``[N, ...]`` gradient entries (entries of the same row are summed).
        lr, beta1, beta2, eps: Adam hyper-parameters.
        step: the Adam step count after this step (1 on the first), for the bias corrections.
        row_wise: ``exp_avg_sq`` is ``[R, 1]``, one second moment a row (the mean of the
            squared gradient over the row), see :class:`RowAdam`.
    """
    n = rows.shape[0]
    if n == 0:
        return
    bshape = (n,) + (1,) * (values.dim() - 1)  # broadcast a [N] mask over [N, ...]
    order = torch.argsort(rows, stable=True)  # [N]
    rs = rows.index_select(0, order)  # [N] sorted rows
    new = torch.ones(n, dtype=torch.bool, device=rows.device)  # [N] first entry of a run
    new[1:] = rs[1:] != rs[:-1]
    seg = new.cumsum(0) - 1  # [N] segment of each sorted entry, 0..U-1
    grad = torch.zeros_like(values).index_add_(0, seg, values.index_select(0, order))  # [N, ...]
    urow = torch.zeros_like(rows).scatter_(0, seg, rs)  # [N] row of each segment, 0 = padding
    pad = (torch.arange(n, device=rows.device) > seg[-1]).view(bshape)  # [N, 1...] (no sync)
    m = exp_avg.index_select(0, urow)  # [N, ...]
    v = exp_avg_sq.index_select(0, urow)
    dm = (grad - m).mul_(1.0 - beta1).masked_fill_(pad, 0.0)  # m' - m, 0 on padding
    g2 = grad.mul_(grad)  # [N, ...]
    if row_wise:
        g2 = g2.mean(dim=1, keepdim=True)  # [N, 1]
    dv = (g2 - v).mul_(1.0 - beta2).masked_fill_(pad, 0.0)  # v' - v
    exp_avg.index_add_(0, urow, dm)
    exp_avg_sq.index_add_(0, urow, dv)
    v.add_(dv)
    floor = _sqrt_floor(eps, v.dtype)
    den = v.clamp_min_(floor).sqrt_().add_(eps)  # same numbers, see _sqrt_floor
    update = m.add_(dm).div_(den).masked_fill_(pad, 0.0)  # [N, ...]
    step_size = _adam_step_size(lr, beta1, beta2, step)
    param.index_add_(0, urow, update, alpha=-step_size)


def _adam_step_size(lr: float, beta1: float, beta2: float, step: float) -> float:
    """Adam's bias-corrected step ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` at step ``t``
    (the same number on every path of :class:`RowAdam`)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


# rows of a chunk of the row update: ~2^16 floats (256 KiB for float32) per temporary, so the
# five temporaries of a chunk stay in the core's cache and only the gathers and scatters of the
# touched rows of the parameter and its moments go to memory
_CHUNK_FLOATS = 1 << 16  # 2^15 .. 2^19 measured at U = 231k, d = 128: 2^16 best


def _sqrt_floor(eps: float, dtype: torch.dtype) -> float:
    """A floor for the second moments below which ``sqrt(v) + eps`` rounds to ``eps`` exactly.

    On x86 CPUs ``sqrt`` of 0 or of a subnormal number is 20-50x slower than of a normal one,
    and the second moments of a wide row hold many exact zeros (the columns of ReLU units that
    were off whenever the row was touched: on kjv-strongs' 8192-wide bag rows ``sqrt_`` was a
    fifth of the row update). Below ``floor``, ``sqrt(v) < eps * finfo.eps / 8``: less than a
    quarter of the spacing of floating-point numbers at ``eps``, so round-to-nearest gives back
    ``eps`` whatever ``v`` is, and ``sqrt(max(v, floor)) + eps`` equals ``sqrt(v) + eps`` bit for
    bit. 0 (a clamp that changes nothing) when that floor would itself be subnormal (a tiny
    ``eps``).
    """
    info = torch.finfo(dtype)
    floor = (eps * info.eps / 8.0) ** 2
    return floor if floor >= info.tiny else 0.0


def _distinct_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [U], values [U, ...])`` of a row-sparse COO gradient, each row once, in order.

    A gradient that is coalesced already, flagged or not, is taken as it is: autograd drops the
    flag when it stores a gradient as ``.grad``, and the sum of two coalesced gradients (a table
    scored twice in one step, e.g. positives and negatives) is sorted and distinct too. Checking
    that the rows increase strictly reads ``N`` ints (a host read: the CPU path only); otherwise
    the gradient is coalesced (a sort of its ``N`` rows).
    """
    if not grad.is_coalesced():
        idx = grad._indices()[0]  # [N]
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            grad = grad.coalesce()
    return grad._indices()[0], grad._values()


def _row_adam_chunked_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    row_wise: bool = False,
) -> None:
    """One SparseAdam update of the distinct ``rows``, a chunk of rows at a time.

    Per chunk: gather the rows' moments, update them (the same operations, in the same order,
    as the one-block update: the numbers do not depend on the chunking), scatter them back and
    add the step into the parameter. Each temporary is a chunk (cache-sized), not ``[U, ...]``:
    no pass over a fresh ``[U, d]`` block (its page faults cost as much as the arithmetic).

    Args:
        param: ``[R, ...]`` parameter, updated in place.
        exp_avg: ``[R, ...]`` first moments, updated in place on ``rows``.
        exp_avg_sq: ``[R, ...]`` second moments, updated in place on ``rows``.
        rows: ``[U]`` int64 *distinct* rows.
        values: ``[U, ...]`` their gradients.
        lr, beta1, beta2, eps: Adam hyper-parameters.
        step: the Adam step count after this step (1 on the first).
        row_wise: ``exp_avg_sq`` is ``[R, 1]`` (one second moment a row), see :class:`RowAdam`.
    """
    n = rows.shape[0]
    if n == 0:
        return
    step_size = _adam_step_size(lr, beta1, beta2, step)
    row_numel = max(1, values[0].numel())
    if row_wise:  # the [R, 1] second moments: index a 1-D view
        if row_numel == 1:
            row_wise = False  # rows of one number: the same update
        else:
            exp_avg_sq = exp_avg_sq.view(-1)
    if row_numel == 1 and all(t.is_contiguous() for t in (param, exp_avg, exp_avg_sq)):
        # rows of one number (a bias [R, 1]): index 1-D views, not R rows of one element each
        param, exp_avg, exp_avg_sq = param.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1)
        values = values.reshape(-1)
    chunk = max(1, _CHUNK_FLOATS // row_numel)
    floor = _sqrt_floor(eps, exp_avg_sq.dtype)
    for start in range(0, n, chunk):
        r = rows[start:start + chunk]  # [c]
        g = values[start:start + chunk]  # [c, ...]
        m = exp_avg.index_select(0, r)  # [c, ...]
        v = exp_avg_sq.index_select(0, r)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        if row_wise:
            v.mul_(beta2).add_(g.square().mean(dim=1), alpha=1.0 - beta2)  # [c]
        else:
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        exp_avg.index_copy_(0, r, m)
        exp_avg_sq.index_copy_(0, r, v)
        den = v.clamp_min_(floor).sqrt_().add_(eps)  # same numbers, see _sqrt_floor
        update = m.div_(den.unsqueeze(1) if row_wise else den)  # [c, ...] in place of the copies
        param.index_add_(0, r, update, alpha=-step_size)


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows present in a sparse gradient (SparseAdam semantics, faster).

    Args:
        params: parameters whose ``.grad`` is a sparse COO tensor (row-sparse, e.g. from
            ``nn.Embedding(sparse=True)``); a dense gradient is accepted too and updates every row.
        lr: learning rate.
        betas: ``(beta1, beta2)`` moment decay rates.
        eps: added to the denominator.
        sync_free: how a sparse gradient is applied: ``None`` (default) coalesces it on the CPU
            and uses the sync-free :func:`_sparse_row_adam_` on other devices; ``True`` /
            ``False`` force one or the other (not saved in the state dict).
        row_wise: opt-in, *not* Adam's semantics: one second moment per row of a 2-D
            parameter (``exp_avg_sq`` ``[R, 1]``: the running mean over the row of the squared
            gradient, as FBGEMM's partial row-wise Adam), the first moment per element as
            usual. The step then moves two ``[U, d]`` blocks fewer (the second moments' gather
            and scatter) and the state is a third smaller. The second-moment shape shows the
            mode: a state of the other mode is refused (not converted).
        native: the CPU update of a sparse float32 2-D gradient (``row_wise=False``) through the
            fused C++ kernel of :mod:`xmc_toolkit.native` (one pass per row; the same numbers as
            the eager update, about 2.5x faster at 10^5 rows): ``None`` (default) when it can
            be built, else the eager update; ``False`` never; ``True`` requires it (raises
            :class:`ConfigError` naming the reason when it cannot be built). Not saved in the
            state dict.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        sync_free: bool | None = None,
        row_wise: bool = False,
        native: bool | None = None,
    ) -> None:
        problems = []
        if not lr >= 0.0:
            problems.append(f"lr={lr!r} must be >= 0")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            problems.append(f"betas={betas!r} must lie in [0, 1)")
        if not eps >= 0.0:
            problems.append(f"eps={eps!r} must be >= 0")
        if problems:
            raise ConfigError(problems)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.sync_free = sync_free
        self.row_wise = bool(row_wise)
        self.native = native
        if native:
            if kernels() is None:
                raise ConfigError(f"RowAdam(native=True) but the native kernel is unavailable "
                                  f"({native_status()['reason']}); use native=None or False")
        if self.row_wise:
            bad = [tuple(p.shape) for g in self.param_groups for p in g["params"] if p.dim() > 2]
            if bad:
                raise ConfigError(f"RowAdam(row_wise=True) takes 1-D or 2-D parameters; got "
                                  f"shapes {bad}: use row_wise=False for them")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    # on the CPU on every device: reading it is no device sync
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = (
                        p.new_zeros(p.shape[0], 1) if self._row_wise_for(p)
                        else torch.zeros_like(p, memory_format=torch.preserve_format))
                elif state["step"].device.type != "cpu":  # a state dict loaded onto a device
                    state["step"] = state["step"].cpu()
                state["step"] += 1
                step = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                row_wise = self._row_wise_for(p)
                want = (p.shape[0], 1) if row_wise else tuple(p.shape)
                if tuple(exp_avg_sq.shape) != want:
                    raise ConfigError(
                        f"RowAdam state exp_avg_sq has shape {tuple(exp_avg_sq.shape)}, expected "
                        f"{want} for row_wise={self.row_wise} (a state saved by the other mode); "
                        "resume with the row_wise setting it was saved with")
                sync_free = (p.device.type != "cpu") if self.sync_free is None else self.sync_free
                if grad.is_sparse and grad.sparse_dim() == 1 and sync_free:
                    _sparse_row_adam_(p, exp_avg, exp_avg_sq, grad._indices()[0], grad._values(),
                                      lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
                                      row_wise=row_wise)
                    continue
                if grad.is_sparse:
                    rows, values = _distinct_rows(grad)  # [U], [U, ...]
                    kernel = self._native_for(p, values, exp_avg, exp_avg_sq, row_wise)
                    if kernel is not None:
                        step_size = _adam_step_size(lr, beta1, beta2, step)
                        kernel.row_adam_(p.data, exp_avg, exp_avg_sq, rows.contiguous(),
                                         values.contiguous(), step_size, beta1, beta2, eps,
                                         _sqrt_floor(eps, p.dtype))
                        # written through a data pointer: bump the version counters as the
                        # in-place ops of the eager update do (autograd's stale-tensor check)
                        for t in (p, exp_avg, exp_avg_sq):
                            increment_version(t)
                        continue
                    _row_adam_chunked_(p, exp_avg, exp_avg_sq, rows, values, lr=lr,
                                       beta1=beta1, beta2=beta2, eps=eps, step=step,
                                       row_wise=row_wise)
                    continue
                m, v = exp_avg, exp_avg_sq
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                if row_wise:
                    v.mul_(beta2).add_(grad.square().mean(dim=1, keepdim=True), alpha=1.0 - beta2)
                else:
                    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = _adam_step_size(lr, beta1, beta2, step)
                floor = _sqrt_floor(eps, v.dtype)
                den = v.clamp_min(floor).sqrt_().add_(eps)  # a new tensor (see _sqrt_floor)
                p.addcdiv_(m, den, value=-step_size)
        return loss

    def _native_for(self, p: torch.Tensor, values: torch.Tensor, exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, row_wise: bool) -> Any:
        """The native kernel module when it applies to this update (CPU, float32, 2-D rows of
        more than one number, contiguous, per-element moments), else ``None``."""
        if self.native is False or row_wise:
            return None
        if p.dim() != 2 or p.shape[1] < 2 or values.dtype != torch.float32:
            return None
        if any(t.dtype != torch.float32 or not t.is_contiguous() or t.shape != p.shape
               for t in (p, exp_avg, exp_avg_sq)):
            return None
        return kernels_for(p)

    def _row_wise_for(self, p: torch.Tensor) -> bool:
        """Whether ``p`` gets one second moment a row (2-D, more than one number a row)."""
        return self.row_wise and p.dim() == 2 and p.shape[1] > 1
