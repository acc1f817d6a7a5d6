"""Model directories: write, verify and read a trained model (``xmc train --out``).

One job: the files of a model directory (``model.safetensors``, ``config.json``,
``labels.json``, ``summary.json``, ``checksums.json``, the featurizer of a text model) and
:class:`LoadedModel`, what inference needs. ``evaluate`` / ``predict`` / ``XMCModel.load`` read
models through here and never import the trainer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .device import resolve_device
from .errors import CheckpointError, XMCError
from .metrics import inverse_propensity_from_counts
from .distributed import DistContext, shard_ranges
from .network import Preprocessor, ShardedXMCNetwork, XMCNetwork, _meta_network
from .train_config import TrainConfig

__all__ = [
    "MODEL_FILE",
    "CONFIG_FILE",
    "LABELS_FILE",
    "SUMMARY_FILE",
    "CHECKSUMS_FILE",
    "CHECKSUMS_FORMAT",
    "LOG_FILE",
    "CKPT_DIR",
    "OUTPUT_FILES",
    "LoadedModel",
    "save_model_dir",
    "prepare_output_dir",
    "verify_model_dir",
    "load_model_dir",
    "MANIFEST_FILE",
    "SHARD_DIR",
    "ENCODER_FILE",
    "save_sharded",
    "read_manifest",
    "read_label_rows",
    "load_sharded_network",
    "consolidate",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
SUMMARY_FILE = "summary.json"
CHECKSUMS_FILE = "checksums.json"  # sha256 + size of every file above, written last
CHECKSUMS_FORMAT = "xmc-toolkit-model-checksums"
LOG_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoint"


@dataclass
class LoadedModel:
    """Everything in a model directory.

    Attributes:
        network: the network on ``device`` in eval mode.
        preprocessor: input transform of the training run.
        config: the training config.
        label_names: ``L`` names or ``None``.
        label_counts: int64 ``[L]`` training label counts.
        num_train: number of training points (for propensities).
        sampler_state: MIDX sampler tensors when saved (for ``--approx``), else ``None``.
        summary: the summary JSON (metrics, steps) or ``{}``.
        featurizer: the text featurizer (:class:`~xmc_toolkit.featurizer.Featurizer`) of a
            model trained on raw text, else ``None``.
    """

    network: XMCNetwork
    preprocessor: Preprocessor
    config: TrainConfig
    label_names: list[str] | None
    label_counts: np.ndarray
    num_train: int
    sampler_state: dict[str, torch.Tensor] | None
    summary: dict[str, Any]
    featurizer: Any = None

    @property
    def num_features(self) -> int:
        return self.network.num_features

    @property
    def num_labels(self) -> int:
        return self.network.num_labels

    def inv_prop(self) -> np.ndarray:
        return inverse_propensity_from_counts(self.label_counts, self.num_train,
                                              self.config.psp_a, self.config.psp_b)


def _model_tensors(network: XMCNetwork, pre: Preprocessor) -> dict[str, torch.Tensor]:
    tensors = {f"network.{k}": v.detach().cpu().contiguous()
               for k, v in network.state_dict().items()}
    if pre.idf is not None:
        tensors["preprocess.idf"] = torch.from_numpy(np.ascontiguousarray(pre.idf))
    return tensors


def save_model_dir(out_dir: str | os.PathLike[str], network: XMCNetwork, pre: Preprocessor,
                   config: TrainConfig, *, label_names: list[str] | None,
                   label_counts: np.ndarray, num_train: int,
                   sampler_state: dict[str, torch.Tensor] | None = None,
                   summary: dict[str, Any] | None = None, featurizer: Any = None) -> Path:
    """Write a model directory (weights, config, label vocabulary and counts) atomically.

    ``featurizer`` (a :class:`~xmc_toolkit.featurizer.Featurizer`, models trained on raw text)
    is written beside the weights as ``featurizer.json`` / ``featurizer.safetensors``.
    """
    from .featurizer import FEATURIZER_FILE, FEATURIZER_TENSORS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [MODEL_FILE, CONFIG_FILE, LABELS_FILE]
    if featurizer is not None:
        written += featurizer.save(out)  # covered by checksums.json too
    else:  # never leave the featurizer of an earlier text model in a reused directory
        for name in (FEATURIZER_FILE, FEATURIZER_TENSORS):
            (out / name).unlink(missing_ok=True)
    tensors = _model_tensors(network, pre)
    if sampler_state:
        tensors.update({f"sampler.{k}": v.detach().cpu().contiguous()
                        for k, v in sampler_state.items()})
    _save_tensors(out / MODEL_FILE, tensors)
    meta = {"format": "xmc-toolkit-model", "version": 1, "num_features": network.num_features,
            "num_labels": network.num_labels, "l2_normalize": pre.l2_normalize,
            "feature_power": float(pre.power),
            "tfidf": pre.idf is not None, "train_config": config.to_dict()}
    _write_json(out / CONFIG_FILE, meta)
    _write_json(out / LABELS_FILE, {"label_names": label_names,
                                    "label_counts": [int(c) for c in label_counts],
                                    "num_train": int(num_train)})
    if summary is not None:
        _write_json(out / SUMMARY_FILE, summary)
        written.append(SUMMARY_FILE)
    elif (out / SUMMARY_FILE).is_file():  # a summary of other weights would mislead
        (out / SUMMARY_FILE).unlink()
    from ._fileio import sha256_file

    files = {f: {"bytes": (out / f).stat().st_size, "sha256": sha256_file(out / f)}
             for f in written}
    _write_json(out / CHECKSUMS_FILE, {"format": CHECKSUMS_FORMAT, "version": 1,
                                       "files": files})
    return out


#: everything a training run writes into its output directory (``run.json``: ``xmc train``)
OUTPUT_FILES = (MODEL_FILE, CONFIG_FILE, LABELS_FILE, SUMMARY_FILE, CHECKSUMS_FILE, LOG_FILE,
                "run.json", CKPT_DIR, "featurizer.json", "featurizer.safetensors", "lineage.json")


def prepare_output_dir(out_dir: str | os.PathLike[str], *, force: bool = False) -> list[str]:
    """Make ``out_dir`` ready for a new training run without losing earlier work silently.

    A missing or empty directory is fine. A directory holding a model or checkpoints, or any
    other files, is refused unless ``force``; with ``force`` the files of an earlier run
    (:data:`OUTPUT_FILES`) are removed first, so no old checkpoint or log is mixed with the
    new ones (other files are left alone).

    Returns:
        The names removed (with ``force``).

    Raises:
        OutputError: ``out_dir`` is a file, or is not empty and ``force`` is not set (the
            message says whether it holds a model, and the flags that proceed).
    """
    import shutil

    from ._fileio import LOCK_FILE
    from .errors import OutputError

    d = Path(out_dir)
    if not d.exists():
        return []
    if not d.is_dir():
        raise OutputError(f"--out {str(d)!r} is a file, not a directory; pass a directory")
    entries = sorted(p.name for p in d.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return []
    if not force:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)"
                                          if len(entries) > 5 else "")
        if (d / MODEL_FILE).exists() or (d / CKPT_DIR).exists():
            raise OutputError(
                f"--out {str(d)!r} already holds a trained model ({shown}); continue it with "
                f"--resume {d}, replace it with --force, or choose another --out")
        if (d / "run.json").exists():
            raise OutputError(
                f"--out {str(d)!r} holds an earlier run that saved no model or checkpoint "
                f"({shown}); start it over with --force, or choose another --out")
        raise OutputError(
            f"--out {str(d)!r} is not empty and holds no model ({shown}); training would "
            "overwrite files there: choose a new or empty --out, or pass --force")
    removed = []
    for name in OUTPUT_FILES:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.warning("--force: removed %s of the earlier run in %s", ", ".join(removed), d)
    return removed


def verify_model_dir(model_dir: str | os.PathLike[str]) -> bool:
    """Check the size and sha256 of every file that ``checksums.json`` lists.

    Returns:
        ``True`` when verified, ``False`` when the directory has no ``checksums.json`` (written
        by an older xmc-toolkit; a warning is logged).

    Raises:
        CheckpointError: a file is missing, has another size or another sha256 (naming it),
            or ``checksums.json`` itself is unreadable.
    """
    from .checkpoint import verify_files

    d = Path(model_dir)
    fix = ("retrain, restore the directory from a backup, or load it unchecked with "
           "--no-verify (verify=False)")
    if not (d / CHECKSUMS_FILE).is_file():
        logger.warning("%s has no %s (written by an older xmc-toolkit): its files cannot be "
                       "verified", d, CHECKSUMS_FILE)
        return False
    try:
        doc = json.loads((d / CHECKSUMS_FILE).read_text(encoding="utf-8"))
        files = doc["files"]
        if doc.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict) or not all(
                isinstance(v, dict) for v in files.values()):
            raise ValueError("not an xmc-toolkit checksum list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{str(d / CHECKSUMS_FILE)!r} is corrupt ({exc}); {fix}") from exc
    verify_files(d, files, corrupt=lambda what: CheckpointError(
        f"model directory {str(d)!r} is corrupt: {what}; {fix}"))
    return True


def load_model_dir(model_dir: str | os.PathLike[str], device: str | torch.device = "auto",
                   *, verify: bool = True) -> LoadedModel:
    """Load a model directory written by :func:`save_model_dir` / ``xmc train``.

    Args:
        model_dir: the directory.
        device: where to put the network (``auto``: CUDA when available).
        verify: check every file against ``checksums.json`` first (:func:`verify_model_dir`;
            one sha256 pass over the directory). ``False`` (``--no-verify``) skips it.

    Raises:
        CheckpointError: the directory is not a model directory, its files are corrupt, or its
            config does not match its weights (checked before anything is built).
    """
    d = Path(model_dir)
    missing = [f for f in (MODEL_FILE, CONFIG_FILE, LABELS_FILE) if not (d / f).is_file()]
    if not d.is_dir() or missing:
        what = "does not exist" if not d.exists() else (
            "is not a directory" if not d.is_dir() else f"lacks {', '.join(missing)}")
        raise CheckpointError(f"{str(d)!r} is not a model directory ({what}); pass the --out "
                              "directory of `xmc train` as --model")
    if verify:
        verify_model_dir(d)
    try:
        meta = json.loads((d / CONFIG_FILE).read_text())
        labels = json.loads((d / LABELS_FILE).read_text())
        config = TrainConfig.from_dict(meta["train_config"])
        D, L = meta["num_features"], meta["num_labels"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (D, L)):
            raise ValueError(f"num_features={D!r}, num_labels={L!r} must be positive integers")
        if not isinstance(labels, dict):
            raise ValueError(f"{LABELS_FILE} holds a {type(labels).__name__}, not an object")
        counts = np.asarray(labels.get("label_counts", [0] * L))
        if counts.shape != (L,) or counts.dtype.kind not in "iu":
            raise ValueError(f"label_counts must be {L} integers, found "
                             f"{str(labels.get('label_counts'))[:40]}")
        num_train = labels.get("num_train", 1)
        if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1:
            raise ValueError(f"num_train={num_train!r} must be a positive integer")
        names = labels.get("label_names")
        if names is not None and (not isinstance(names, list) or len(names) != L):
            raise ValueError(f"label_names must be a list of {L} names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, XMCError) as exc:
        raise CheckpointError(f"{str(d)!r}: {CONFIG_FILE} or {LABELS_FILE} is corrupt ({exc}); "
                              "retrain or restore the directory") from exc
    _check_model_shapes(d / MODEL_FILE, D, L, config)  # before anything of size D or L exists
    tensors = _load_tensors(d / MODEL_FILE)
    dev = resolve_device(device)
    network = XMCNetwork(D, L, config)
    state = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(d / MODEL_FILE)!r} does not match its config: {exc}") from exc
    network.to(dev).eval()
    idf = tensors.get("preprocess.idf")
    pre = Preprocessor(None if idf is None else idf.numpy(), bool(meta.get("l2_normalize", True)),
                       float(meta.get("feature_power", 1.0)))  # models saved before it: 1
    sampler_state = {k[len("sampler."):]: v for k, v in tensors.items()
                     if k.startswith("sampler.")} or None
    summary: dict[str, Any] = {}
    if (d / SUMMARY_FILE).is_file():
        with contextlib.suppress(ValueError):
            summary = json.loads((d / SUMMARY_FILE).read_text())
    from .featurizer import Featurizer

    featurizer = Featurizer.load(d) if Featurizer.exists(d) else None
    if featurizer is not None and featurizer.num_features != D:
        raise CheckpointError(f"{str(d)!r}: the featurizer makes {featurizer.num_features} "
                              f"features but the model takes {D}; retrain the model")
    return LoadedModel(network, pre, config, names, counts.astype(np.int64), num_train,
                       sampler_state, summary, featurizer)



def _check_model_shapes(path: Path, num_features: int, num_labels: int,
                        config: TrainConfig) -> None:
    """Compare the tensor shapes stored in ``path`` with those ``config`` gives, reading only
    the safetensors header, so that a crafted ``config.json`` (``num_features`` 1e12) fails
    before anything of that size is allocated."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = {k[len("network."):]: tuple(fh.get_slice(k).get_shape())
                      for k in fh.keys() if k.startswith("network.")}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc}); "
                              "retrain or restore the file") from exc
    try:
        expected = {k: tuple(v.shape) for k, v in
                    _meta_network(num_features, num_labels, config).state_dict().items()}
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"{str(path.parent)!r}: {CONFIG_FILE} describes no valid network "
                              f"({exc}); retrain or restore the directory") from exc
    bad = [f"{k}: config gives {expected.get(k)}, file holds {stored.get(k)}"
           for k in sorted(set(expected) | set(stored)) if expected.get(k) != stored.get(k)]
    if bad:
        raise CheckpointError(
            f"{str(path)!r} does not match {CONFIG_FILE} (num_features={num_features}, "
            f"num_labels={num_labels}): {'; '.join(bad[:3])}"
            + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            + "; the directory is corrupt: retrain or restore it")



def _write_json(path: Path, obj: Any) -> None:
    from ._fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomic safetensors save (:func:`xmc_toolkit._fileio.atomic_write`)."""
    from ._fileio import atomic_write, save_safetensors

    atomic_write(path, lambda p: save_safetensors(tensors, p))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc}); "
                              "retrain or restore the file") from exc


# sharded model directories (one label-row file per rank)
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "sharded"
ENCODER_FILE = "encoder.safetensors"


def _shard_file(rank: int, world: int) -> str:
    return f"labels-{rank:05d}-of-{world:05d}.safetensors"


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    _save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def save_sharded(out_dir: str | os.PathLike[str], network: ShardedXMCNetwork, ctx: DistContext,
                 *, config: Any, preprocessor: Any, label_names: list[str] | None,
                 label_counts: np.ndarray, num_train: int,
                 summary: dict[str, Any] | None = None) -> Path:
    """Write a sharded checkpoint (collective: every rank calls it).

    Layout of ``out_dir``: ``labels-RRRRR-of-WWWWW.safetensors`` per rank (``weight [L_r, d]``,
    ``bias [L_r]``), ``encoder.safetensors`` (encoder state, ``preprocess.idf``) and
    ``manifest.json`` (rank 0; row ranges, shapes, config, label vocabulary), written last so a
    complete manifest means a complete checkpoint.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": network.weight.weight}
    if network.bias is not None:
        tensors["bias"] = network.bias.weight.view(-1)
    _atomic_save(out / _shard_file(ctx.rank, ctx.world_size), tensors)
    if ctx.is_main:
        enc = {f"encoder.{k}": v for k, v in network.encoder.state_dict().items()}
        if preprocessor.idf is not None:
            enc["preprocess.idf"] = torch.from_numpy(np.ascontiguousarray(preprocessor.idf))
        _atomic_save(out / ENCODER_FILE, enc)
    ctx.barrier()
    if ctx.is_main:
        manifest = {
            "format": "xmc-toolkit-sharded", "version": 1,
            "num_labels": network.num_labels, "num_features": network.num_features,
            "dim": int(network.weight.weight.shape[1]), "bias": network.bias is not None,
            "world_size": ctx.world_size,
            "shards": [{"rank": r, "file": _shard_file(r, ctx.world_size), "start": a, "stop": b}
                       for r, (a, b) in enumerate(shard_ranges(network.num_labels,
                                                               ctx.world_size))],
            "encoder_file": ENCODER_FILE,
            "l2_normalize": bool(preprocessor.l2_normalize),
            "feature_power": float(preprocessor.power),
            "train_config": config.to_dict(),
            "label_names": label_names,
            "label_counts": [int(c) for c in label_counts],
            "num_train": int(num_train),
            "summary": summary,
        }
        from ._fileio import atomic_write_text

        atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2))
    ctx.barrier()
    return out


def read_manifest(sharded_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a sharded checkpoint; :class:`CheckpointError` when absent or corrupt."""
    path = Path(sharded_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist; pass the 'sharded' directory "
                              "written by distributed training")
    try:
        man = json.loads(path.read_text())
        if man.get("format") != "xmc-toolkit-sharded":
            raise ValueError(f"format is {man.get('format')!r}")
        ranges = [(int(s["start"]), int(s["stop"])) for s in man["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a valid sharded manifest ({exc})") from exc
    L = int(man["num_labels"])
    flat = sorted(ranges)
    if not flat or flat[0][0] != 0 or flat[-1][1] != L or any(
            a[1] != b[0] for a, b in zip(flat, flat[1:])):
        raise CheckpointError(f"{str(path)!r}: shard ranges {ranges} do not tile [0, {L})")
    return man


def read_label_rows(sharded_dir: str | os.PathLike[str], start: int, stop: int,
                    manifest: dict[str, Any] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``[start, stop)`` of the label table of a sharded checkpoint, from whichever shard
    files hold them (any number of saving ranks): ``(weight [n, d], bias [n] or None)``."""
    from safetensors import safe_open

    d = Path(sharded_dir)
    man = manifest or read_manifest(d)
    dim = int(man["dim"])
    weight = torch.empty(max(0, stop - start), dim)
    bias = torch.empty(max(0, stop - start)) if man["bias"] else None
    for s in man["shards"]:
        a, b = max(start, int(s["start"])), min(stop, int(s["stop"]))
        if a >= b:
            continue
        path = d / s["file"]
        try:
            with safe_open(str(path), framework="pt") as fh:
                lo = a - int(s["start"])
                weight[a - start : b - start] = fh.get_slice("weight")[lo : lo + b - a]
                if bias is not None:
                    bias[a - start : b - start] = fh.get_slice("bias")[lo : lo + b - a]
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{str(path)!r} is missing or unreadable ({exc}); the sharded "
                                  "checkpoint is incomplete") from exc
    return weight, bias


def _read_encoder(sharded_dir: Path, man: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = sharded_dir / man["encoder_file"]
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{str(path)!r} is missing or unreadable ({exc})") from exc


def load_sharded_network(sharded_dir: str | os.PathLike[str], rank: int = 0,
                         world_size: int = 1) -> ShardedXMCNetwork:
    """Rebuild the network of shard ``rank`` of ``world_size`` (any count, not only the saving
    one) from a sharded checkpoint, on CPU."""
    d = Path(sharded_dir)
    man = read_manifest(d)
    cfg = TrainConfig.from_dict(man["train_config"])
    net = ShardedXMCNetwork(int(man["num_features"]), int(man["num_labels"]), cfg, rank,
                            world_size)
    enc = _read_encoder(d, man)
    state = {k[len("encoder."):]: v for k, v in enc.items() if k.startswith("encoder.")}
    try:
        net.encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(d)!r}: encoder does not match its config ({exc})") from exc
    w, b = read_label_rows(d, net.label_offset, net.label_offset + net.num_local, man)
    with torch.no_grad():
        net.weight.weight.copy_(w)
        if net.bias is not None and b is not None:
            net.bias.weight.copy_(b[:, None])
    return net


def consolidate(sharded_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Merge a sharded checkpoint into one normal model directory (``xmc eval`` / ``predict``).

    Runs in one process and holds the whole ``[L, d]`` table in memory once.
    """
    d = Path(sharded_dir)
    man = read_manifest(d)
    cfg = TrainConfig.from_dict(man["train_config"])
    D, L = int(man["num_features"]), int(man["num_labels"])
    net = XMCNetwork(D, L, cfg)
    enc = _read_encoder(d, man)
    state = {k: v for k, v in enc.items() if k.startswith("encoder.")}
    w, b = read_label_rows(d, 0, L, man)
    state["labels.weight.weight"] = w
    if b is not None:
        state["labels.bias.weight"] = b[:, None]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(d)!r} does not match its config ({exc})") from exc
    idf = enc.get("preprocess.idf")
    pre = Preprocessor(None if idf is None else idf.numpy(), bool(man["l2_normalize"]),
                       float(man.get("feature_power", 1.0)))
    counts = np.asarray(man.get("label_counts") or [0] * L, dtype=np.int64)
    return save_model_dir(out_dir, net, pre, cfg, label_names=man.get("label_names"),
                          label_counts=counts, num_train=int(man.get("num_train", 1)),
                          summary=man.get("summary"))
