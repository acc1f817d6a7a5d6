"""Atomic, checksummed checkpoints: safetensors per tensor group + JSON meta, strict loading.

Directory layout written by :func:`save_checkpoint` (``root`` is e.g. ``xmc train --out``)::

    root/
      latest                      text file holding the name of the newest complete checkpoint
      ckpt-00001200/
        model.safetensors         one safetensors file per group ("model", "optimizer", ...)
        optimizer.safetensors
        rng.safetensors
        meta.json                 JSON: config, label names, step/epoch, metrics, ...
        manifest.json             written LAST: format, step, sha256 + size of every file above
      ckpt-00001000/              the previous good checkpoint (``keep=2``)

Every file is written to a temporary name, fsynced and renamed (``os.replace``); the whole
checkpoint is staged in a hidden temporary directory that is renamed into place before ``latest``
is atomically updated. A torn write therefore leaves either no manifest (the checkpoint is
ignored) or a checksum mismatch (:class:`CheckpointError` naming the file and the previous
checkpoint).

Public API::

    save_checkpoint(root, tensors={"model": {...}, ...}, meta={...}, step=None, keep=2) -> Path
    load_checkpoint(path, verify=True, device="cpu", groups=None, fallback=False)
        -> (tensors: dict[group, dict[name, Tensor]], meta: dict)
    resolve_checkpoint(path) -> Path        list_checkpoints(root) -> list[Path]
    verify_checkpoint(ckpt_dir) -> None
    load_into_module(module, state, strict=True) -> (missing, unexpected)
    flatten_state(obj) / unflatten_state(tensors, structure)      nested state <-> flat tensors
    optimizer_state_to_tensors(opt) -> (tensors, structure)  /  optimizer_state_from_tensors(...)
    rng_state_to_tensors(generators=None) -> dict[str, Tensor]  /  restore_rng_state(tensors, ...)

``path`` for loading may be the root (follows ``latest``) or one ``ckpt-*`` directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._fileio import (atomic_write_bytes, fsync_dir, output_error, save_safetensors,
                      set_default_mode, sha256_file)
from .errors import CheckpointError, ConfigError, OutputError

__all__ = [
    "FORMAT",
    "MANIFEST",
    "META",
    "LATEST",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "verify_files",
    "load_into_module",
    "flatten_state",
    "unflatten_state",
    "optimizer_state_to_tensors",
    "optimizer_state_from_tensors",
    "rng_state_to_tensors",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)

FORMAT = "xmc-toolkit-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# -- low-level atomic file helpers -------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _safe_name(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` for a plain file name; anything that could leave ``directory``
    (``..``, a separator, an absolute path) is refused."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or os.sep in name or "\0" in name or Path(name).is_absolute()):
        raise CheckpointError(
            f"{what} in {str(directory)!r} names the file {name!r}, which is not a plain file "
            "name inside that directory; the directory is corrupt or was crafted: retrain or "
            "restore it from a backup")
    return directory / name


def _prepare_tensors(group: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, non-shared copies that safetensors accepts."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"tensor names must be strings; group {group!r} has {name!r}")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"{group}/{name} is a {type(t).__name__}, not a tensor; put non-tensor values "
                "in meta (or use flatten_state)"
            )
        if t.is_sparse or t.layout != torch.strided:
            raise CheckpointError(f"{group}/{name} is a sparse tensor; store t.to_dense()")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        whole = storage.nbytes() == t.numel() * t.element_size()
        if not t.is_contiguous() or not whole or (ptr in seen and t.numel() > 0):
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# -- save ---------------------------------------------------------------------------------------
def save_checkpoint(
    root: str | os.PathLike[str],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    meta: Mapping[str, Any] | None = None,
    step: int | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and point ``root/latest`` at it.

    Args:
        root: checkpoint root directory (created if needed).
        tensors: group name -> {tensor name -> tensor}; one ``<group>.safetensors`` per group.
            Group names use letters, digits, ``_`` and ``-``.
        meta: JSON-serialisable metadata (config, label names, step/epoch, metrics).
        step: checkpoint number; defaults to ``meta["step"]``.
        keep: number of complete checkpoints to keep (older ones are deleted; >= 1).

    Returns:
        The written checkpoint directory ``root/ckpt-<step>``.

    Raises:
        ConfigError: bad ``step`` / ``keep``.
        CheckpointError: bad group names, non-tensors, meta that is not JSON-serialisable.
    """
    meta = dict(meta or {})
    if step is None:
        step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step={step!r} must be a non-negative integer (pass step= or meta['step'])")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep={keep!r} must be an integer >= 1 (--keep-checkpoints)")
    bad = [g for g in tensors if not isinstance(g, str) or not _GROUP_RE.match(g)]
    if bad:
        raise CheckpointError(f"invalid tensor group names {bad!r}: use letters, digits, '_', '-'")
    try:
        meta_bytes = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {exc}") from exc

    root = Path(root)
    try:
        return _save_checkpoint(root, tensors, meta_bytes, step, keep)
    except OSError as exc:  # disk full, permissions, ...: the previous checkpoint survives
        prev = list_checkpoints(root)
        kept = (f"; the previous checkpoint {str(prev[-1])!r} is kept" if prev
                else "; no earlier checkpoint exists")
        raise OutputError(f"{output_error(root, exc, 'write a checkpoint in')}{kept}") from exc


def _save_checkpoint(root: Path, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                     meta_bytes: bytes, step: int, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:08d}"
    stage = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for group, group_tensors in tensors.items():
            prepared = _prepare_tensors(group, group_tensors)
            fname = f"{group}.safetensors"
            tmp = stage / f".{fname}.tmp"
            save_safetensors(prepared, tmp, metadata={"format": FORMAT, "group": group})
            set_default_mode(tmp)  # safetensors creates 0600 files
            _fsync_file(tmp)
            os.replace(tmp, stage / fname)
            files[fname] = {
                "group": group,
                "tensors": len(prepared),
                "bytes": (stage / fname).stat().st_size,
                "sha256": sha256_file(stage / fname),
            }
        atomic_write_bytes(stage / META, meta_bytes)
        files[META] = {"bytes": len(meta_bytes), "sha256": hashlib.sha256(meta_bytes).hexdigest()}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        atomic_write_bytes(stage / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
        fsync_dir(stage)
        final = root / name
        trash = None
        if final.exists():  # re-saving the same step: move the old one aside first
            trash = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
        os.replace(stage, final)
        fsync_dir(root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    atomic_write_bytes(root / LATEST, (name + "\n").encode("utf-8"))
    fsync_dir(root)
    _prune(root, keep, current=final)
    logger.info("saved checkpoint %s", final)
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    complete = list_checkpoints(root)
    survivors = set(complete[-keep:]) | {current}
    for ckpt in complete:
        if ckpt not in survivors:
            shutil.rmtree(ckpt, ignore_errors=True)
            logger.debug("pruned old checkpoint %s", ckpt)
    for stale in root.glob(".ckpt-*.tmp-*"):  # staging directories of crashed saves
        shutil.rmtree(stale, ignore_errors=True)


# -- locate -------------------------------------------------------------------------------------
def _step_of(p: Path) -> int:
    m = _CKPT_RE.match(p.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (those with a manifest) under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CKPT_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=_step_of)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory to load for ``path`` (a root or one ``ckpt-*`` directory).

    Raises:
        CheckpointError: ``path`` is not a model directory.
    """
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"model directory {str(p)!r} does not exist; check the path")
    latest = p / LATEST
    if latest.is_file():
        try:
            name = latest.read_bytes()[:256].decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _CKPT_RE.match(name) and (p / name / MANIFEST).is_file():
            return p / name
        logger.warning("%s does not name a complete ckpt-* checkpoint (%r); using the newest "
                       "complete one", latest, name[:40])
    complete = list_checkpoints(p)
    if complete:
        return complete[-1]
    raise CheckpointError(
        f"{str(p)!r} is not a model directory: it has no {MANIFEST}, no '{LATEST}' pointer and "
        "no complete ckpt-* checkpoint; pass the directory written by training (xmc train --out)"
    )


def _previous(ckpt: Path) -> Path | None:
    older = [c for c in list_checkpoints(ckpt.parent) if _step_of(c) < _step_of(ckpt)]
    return older[-1] if older else None


def _corrupt(ckpt: Path, what: str) -> CheckpointError:
    prev = _previous(ckpt)
    hint = (
        f"; the previous checkpoint {str(prev)!r} exists: load it instead "
        "(load_checkpoint(..., fallback=True) does so automatically)"
        if prev is not None
        else "; no previous checkpoint exists, retrain or restore from a backup"
    )
    return CheckpointError(f"checkpoint {str(ckpt)!r} is corrupt: {what}{hint}")


def _read_manifest(ckpt: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{str(ckpt)!r} is not a model directory: it has no {MANIFEST}; pass the directory "
            "written by training (xmc train --out)"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(ckpt, f"{MANIFEST} is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise _corrupt(ckpt, f"{MANIFEST} cannot be read ({exc.strerror})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(ckpt / MANIFEST)!r} is not an xmc-toolkit checkpoint manifest "
            f"(format={manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    version = manifest.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise _corrupt(ckpt, f"{MANIFEST} has version {version!r}, not an integer")
    if version > VERSION:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} has format version {version}, newer than this "
            f"xmc-toolkit understands ({VERSION}); upgrade xmc-toolkit"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(v, dict) for v in files.values()):
        raise _corrupt(ckpt, f"{MANIFEST} lists no files (files={str(files)[:60]})")
    for fname in files:
        _safe_name(ckpt, fname, MANIFEST)
    return manifest


def verify_files(directory: Path, files: Mapping[str, Any],
                 corrupt: Any = None) -> None:
    """Check size and sha256 of every ``{name: {"bytes": n, "sha256": hex}}`` in ``directory``.

    ``corrupt(what)`` builds the error (default: a :class:`CheckpointError` naming the
    directory). Names that would leave ``directory`` are refused.
    """
    def fail(what: str) -> CheckpointError:
        if corrupt is not None:
            return corrupt(what)
        return CheckpointError(f"{str(directory)!r} is corrupt: {what}")

    for fname, info in files.items():
        f = _safe_name(directory, fname, "the checksum list")
        if not f.is_file():
            raise fail(f"{fname} is missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise fail(f"{fname} has {size} bytes, the checksums record {info.get('bytes')}")
        digest = sha256_file(f)
        if digest != info.get("sha256"):
            raise fail(f"{fname} has sha256 {digest[:12]}..., the checksums record "
                       f"{str(info.get('sha256'))[:12]}...")


def verify_checkpoint(ckpt: str | os.PathLike[str]) -> None:
    """Check the size and sha256 of every file listed in the manifest.

    Raises:
        CheckpointError: naming the corrupt or missing file and the previous checkpoint.
    """
    ckpt = Path(ckpt)
    manifest = _read_manifest(ckpt)
    verify_files(ckpt, manifest["files"], corrupt=lambda what: _corrupt(ckpt, what))


# -- load ---------------------------------------------------------------------------------------
def load_checkpoint(
    path: str | os.PathLike[str],
    verify: bool = True,
    device: str | torch.device = "cpu",
    groups: list[str] | None = None,
    fallback: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: checkpoint root (follows ``latest``) or one ``ckpt-*`` directory.
        verify: check every file's sha256 against the manifest first.
        device: where to load the tensors.
        groups: only these tensor groups (``None``: all).
        fallback: if the chosen checkpoint is corrupt, log a warning and load the newest older
            intact one instead of raising.

    Returns:
        ``(tensors, meta)``: group -> {name -> tensor}, and the JSON meta.

    Raises:
        CheckpointError: not a model directory, corrupt files (naming the previous checkpoint),
            unknown groups.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path)
    try:
        if verify:
            verify_checkpoint(ckpt)
        manifest = _read_manifest(ckpt)
        files = manifest.get("files", {})
        available = {info["group"]: f for f, info in files.items()
                     if isinstance(info.get("group"), str)}
        wanted = list(available) if groups is None else list(groups)
        unknown = [g for g in wanted if g not in available]
        if unknown:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} has no tensor group(s) {unknown}; it has "
                f"{sorted(available)}"
            )
        out: dict[str, dict[str, torch.Tensor]] = {}
        for g in wanted:
            try:
                out[g] = load_file(str(ckpt / available[g]), device=str(device))
            except (SafetensorError, OSError, ValueError) as exc:
                raise _corrupt(ckpt, f"{available[g]} cannot be read ({exc})") from exc
        try:
            meta = json.loads((ckpt / META).read_text()) if META in files else {}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _corrupt(ckpt, f"{META} cannot be read ({exc})") from exc
        if not isinstance(meta, dict):
            raise _corrupt(ckpt, f"{META} holds a {type(meta).__name__}, not a JSON object")
    except CheckpointError as exc:
        prev = _previous(ckpt) if fallback and "is corrupt" in str(exc) else None
        if prev is None:
            raise
        logger.warning("%s; falling back to %s", exc, prev)
        return load_checkpoint(prev, verify=verify, device=device, groups=groups, fallback=True)
    return out, meta


def load_into_module(
    module: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy ``state`` into ``module``, reporting every problem in one :class:`CheckpointError`.

    Args:
        module: target module (tensors are copied onto its parameters' devices).
        state: name -> tensor (e.g. ``tensors["model"]`` from :func:`load_checkpoint`).
        strict: missing or unexpected names are errors; shape mismatches always are.

    Returns:
        ``(missing, unexpected)`` names (both empty when ``strict``).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected in the checkpoint: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match {type(module).__name__} (was it saved with another "
            f"config or data set?): {' | '.join(problems)}"
        )
    module.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
    return missing, unexpected


# -- nested state <-> flat tensors ----------------------------------------------------------------
def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, JSON scalars) into flat tensors and a
    JSON-able structure that refers to them by name.

    Returns:
        ``(tensors, structure)``; :func:`unflatten_state` inverts it (dict keys keep their type,
        tuples stay tuples).
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            if path in tensors:
                raise CheckpointError(f"state has two entries named {path!r}")
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, Mapping):
            items = []
            for k, v in x.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise CheckpointError(f"state key {k!r} at {path!r} must be a str or int")
                items.append([k, enc(v, f"{path}.{k}" if path else str(k))])
            return {"__dict__": items}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        raise CheckpointError(f"cannot store {type(x).__name__} at {path!r} in a checkpoint")

    structure = enc(obj, prefix)
    return tensors, structure


def unflatten_state(tensors: Mapping[str, torch.Tensor], structure: Any) -> Any:
    """Inverse of :func:`flatten_state`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                key = x["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"checkpoint is missing tensor {key!r} of a saved state")
                return tensors[key]
            if "__dict__" in x:
                return {k: dec(v) for k, v in x["__dict__"]}
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            raise CheckpointError(f"unrecognised state structure entry {sorted(x)!r}")
        return x

    return dec(structure)


def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], Any]:
    """Flatten an optimizer (or its ``state_dict()``) for a safetensors group.

    Works for Adam, AdamW, SparseAdam, Adagrad, SGD and any optimizer whose state is tensors and
    JSON scalars. Store ``tensors`` as a group and ``structure`` in the meta.
    """
    sd = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    return flatten_state(sd)


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], structure: Any) -> dict[str, Any]:
    """Rebuild the optimizer ``state_dict`` (pass it to ``optimizer.load_state_dict``)."""
    sd = unflatten_state(tensors, structure)
    if not isinstance(sd, dict) or "param_groups" not in sd or "state" not in sd:
        raise CheckpointError("the saved optimizer structure has no 'state' / 'param_groups'")
    return sd


# -- RNG states ---------------------------------------------------------------------------------
def _json_tensor(obj: Any) -> torch.Tensor:
    data = json.dumps(obj).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _tensor_json(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.cpu().numpy().tobytes()).decode("utf-8"))


def _np_plain(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, dict):
        return {k: _np_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_np_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _np_restore(x: Any) -> Any:
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        return {k: _np_restore(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_np_restore(v) for v in x]
    return x


def rng_state_to_tensors(
    generators: Mapping[str, torch.Generator | np.random.Generator] | None = None,
    include_cuda: bool = True,
) -> dict[str, torch.Tensor]:
    """Capture every random state needed for exact resume as tensors (one safetensors group).

    Keys: ``torch.cpu``, ``torch.cuda.<i>`` (when CUDA is available and ``include_cuda``),
    ``numpy.global``, ``python.random`` and ``gen.<name>`` for each extra generator.
    """
    out: dict[str, torch.Tensor] = {"torch.cpu": torch.get_rng_state()}
    if include_cuda and torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch.cuda.{i}"] = s
    out["numpy.global"] = _json_tensor(_np_plain(np.random.get_state(legacy=False)))
    version, internal, gauss = random.getstate()
    out["python.random"] = _json_tensor([version, list(internal), gauss])
    for name, g in (generators or {}).items():
        if isinstance(g, torch.Generator):
            out[f"gen.{name}"] = g.get_state()
        elif isinstance(g, np.random.Generator):
            out[f"gen.{name}"] = _json_tensor(_np_plain(g.bit_generator.state))
        else:
            raise CheckpointError(f"generator {name!r} is a {type(g).__name__}, not a torch or numpy Generator")
    return out


def restore_rng_state(
    tensors: Mapping[str, torch.Tensor],
    generators: Mapping[str, torch.Generator | np.random.Generator] | None = None,
) -> None:
    """Restore what :func:`rng_state_to_tensors` captured (CUDA states only where present)."""
    if "torch.cpu" in tensors:
        torch.set_rng_state(tensors["torch.cpu"].cpu().to(torch.uint8))
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        for i in range(n):
            t = tensors.get(f"torch.cuda.{i}")
            if t is not None:
                torch.cuda.set_rng_state(t.cpu().to(torch.uint8), device=i)
    if "numpy.global" in tensors:
        np.random.set_state(_np_restore(_tensor_json(tensors["numpy.global"])))
    if "python.random" in tensors:
        version, internal, gauss = _tensor_json(tensors["python.random"])
        random.setstate((version, tuple(internal), gauss))
    for name, g in (generators or {}).items():
        t = tensors.get(f"gen.{name}")
        if t is None:
            raise CheckpointError(
                f"the checkpoint has no state for generator {name!r}; it has "
                f"{sorted(k[4:] for k in tensors if k.startswith('gen.'))}"
            )
        if isinstance(g, torch.Generator):
            g.set_state(t.cpu().to(torch.uint8))
        else:
            g.bit_generator.state = _np_restore(_tensor_json(t))
