"""Device selection shared by every torch component."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

__all__ = ["resolve_device", "set_threads", "amp_setup", "branch_free"]


def branch_free(device: torch.device) -> bool:
    """Whether code on ``device`` must avoid data-dependent branches (no tensor value read on
    the host): everywhere but on the CPU, where reading a value costs no device
    synchronisation. Each caller imports it under its own name (``_branch_free``), so a test can
    force the branch-free path of one component on the CPU."""
    return device.type != "cpu"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a ``torch.device``) into a ``torch.device``.

    ``"auto"`` picks CUDA when available, else CPU. Asking for CUDA on a machine without it raises
    :class:`ConfigError` naming the ``--device`` flag.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use --device cpu or auto")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):  # e.g. mps: torch knows the name, this build may not
        raise ConfigError(f"device={device!r} is not supported by xmc-toolkit; use --device "
                          "auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s); use --device cuda:0 "
                          "or auto")
    return dev


def set_threads(num_threads: int) -> None:
    """Use ``num_threads`` CPU threads for torch's operations (``--threads N``); 0 keeps torch's
    default (one per core, or ``OMP_NUM_THREADS``).

    Raises:
        ConfigError: ``num_threads`` is negative.
    """
    if num_threads < 0:
        raise ConfigError(f"threads={num_threads} must be >= 0 (0: torch's default) (--threads)")
    if num_threads:
        torch.set_num_threads(int(num_threads))


def amp_setup(mode: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """``(autocast dtype or None, GradScaler or None)`` of ``--amp mode`` on ``device``
    (CPU: never; ``auto``: bf16 where the GPU has it, else fp16 with a scaler)."""
    if device.type != "cuda" or mode == "off":
        return None, None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")
