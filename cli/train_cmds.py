"""``xmc train``, ``xmc predict`` and ``xmc export``: a thin shell over the library.

Every :class:`~xmc_toolkit.train.TrainConfig` field is a flag (``--batch-size``, ``--loss``, ...).
Config merging order: defaults -> ``--resume`` directory's saved config -> ``--config file.json``
-> flags.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

import click

from cli._options import (given_fields, load_data, model_text_field_options, no_verify_option,
                          text_field_options, zero_based, zero_based_option)
from xmc_toolkit.errors import ConfigError

__all__ = ["COMMANDS", "train", "predict", "export"]

_DATA = click.Path(exists=True, dir_okay=False, path_type=Path)
# data sets may be split prefixes (med/trn) or folders: the loader checks them, as `data info`
_DATASET = click.Path(path_type=Path)
_MODEL = click.Path(path_type=Path)
RUN_FILE = "run.json"  # data paths and config of a run in its --out directory (for --resume)
#: where the label table lives (--placement): auto picks sharded under torchrun
PLACEMENTS = ("auto", "local", "sharded")


def _read_run(resume: Path) -> dict[str, Any]:
    """``run.json`` of a ``--resume`` directory, checked."""
    run_file = resume / RUN_FILE
    if not run_file.is_file():
        raise ConfigError(f"{str(resume)!r} is not a training run directory ({RUN_FILE} is "
                          "missing); pass the --out directory of an earlier `xmc train`")
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
        if not isinstance(run, dict) or not isinstance(run.get("config", {}), dict):
            raise ValueError("not a JSON object with a 'config' object")
        if not all(isinstance(run.get(k), (str, type(None))) for k in ("data", "val")):
            raise ValueError("'data' and 'val' must be file paths")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(run_file)!r} is unreadable ({exc}); it is written by `xmc "
                          "train`: restore it, or start a new run with --out") from exc
    return run


def _config_cls() -> Any:
    # the config module imports no torch: the CLI starts without it
    from xmc_toolkit.train_config import TrainConfig

    return TrainConfig


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in str(text).replace(" ", "").split(",") if t)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} must be comma-separated integers, e.g. 1,3,5") \
            from exc


def _fields_as_options(cls: Any, func: Any) -> Any:
    """Add one option per field of the config dataclass ``cls`` (default ``None``: "not given")."""
    hints = typing.get_type_hints(cls)
    for f in reversed(dataclasses.fields(cls)):
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{f.metadata.get('help', '')} [default: {shown}]"
        if typ is bool:
            opt = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None,
                               help=help_)
        elif typing.get_origin(typ) is tuple:
            opt = click.option(flag, f.name, default=None, metavar="N,N,..",
                               callback=lambda c, p, v: None if v is None else _int_list(v),
                               help=help_)
        else:
            base = {int: int, float: float, str: str}.get(typ, str)
            opt = click.option(flag, f.name, type=base, default=None, help=help_)
        func = opt(func)
    return func


def _config_options(func: Any) -> Any:
    """Add one option per TrainConfig field."""
    from xmc_toolkit.train_config import TrainConfig

    return _fields_as_options(TrainConfig, func)


def _featurizer_options(func: Any) -> Any:
    """Add one option per FeaturizerConfig field (raw-text training data only)."""
    from xmc_toolkit.featurizer import FeaturizerConfig

    return _fields_as_options(FeaturizerConfig, func)


def threads_option(func: Any) -> Any:
    """``--threads N``: CPU threads of torch (0: its default)."""
    return click.option("--threads", "threads", type=click.IntRange(min=0), default=0,
                        show_default=True,
                        help="CPU threads for torch (0: one per core or OMP_NUM_THREADS).")(func)


def apply_threads(threads: int) -> None:
    from xmc_toolkit.device import set_threads

    set_threads(threads)


FEATURIZER_KEY = "featurizer"  # the featurizer settings' block in --print-config / --config


@click.command("train")
@click.option("--data", "data", type=_DATASET,
              help="Training data set: raw text (.jsonl/.tsv/.csv) or any feature-vector format.")
@click.option("--val", "val", type=_DATASET, default=None,
              help="Validation data set (same feature/label space; text for text data); "
                   "default: none, or --val-fraction of the training rows.")
@click.option("--out", "out", type=_MODEL, default=None,
              help="Output model directory (weights, config, metrics.jsonl, checkpoint/).")
@click.option("--config", "config_file", type=_DATA, default=None,
              help="JSON file of TrainConfig values (flags override it).")
@click.option("--resume", "resume", type=_MODEL, default=None,
              help="Continue the interrupted run in this directory exactly (same data/config).")
@click.option("--force", is_flag=True,
              help="Replace the model in a non-empty --out (its checkpoints and logs are "
                   "removed first), or --resume on data that changed since the checkpoint.")
@click.option("--print-config", is_flag=True,
              help="Print the merged config (every default) as JSON and exit.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--labels", "labels_file", type=_DATA, default=None,
              help="With an .npz feature matrix --data X.npz: its label matrix Y.npz "
                   "(scipy.sparse.save_npz / PECOS pairs under any names).")
@click.option("--label-names", "label_names", type=_DATA, default=None,
              help="Feature-vector data: label names of --data and --val, one a line in "
                   "label-id order (or a Mulan XML), stored in the model so that predictions "
                   "carry names; with --init-from they decide which labels are new.")
@click.option("--init-from", "init_from", type=_MODEL, default=None,
              help="Start from this trained model directory: its encoder, label rows and "
                   "optimizer state are kept, labels of --data it does not know are added "
                   "(matched by name when both carry names, else by id) and the model is "
                   "fine-tuned on --data for --epochs (default 2). The directory is only read.")
@click.option("--ignore-extra", is_flag=True,
              help="With --init-from: cut (or pad) --data's feature columns to the model's "
                   "instead of failing.")
@click.option("--placement", type=click.Choice(PLACEMENTS), default="auto", show_default=True,
              help="Where the label table lives: local (one process holds it), sharded (rows "
                   "split across the torchrun processes, DDP encoder), auto (sharded under "
                   "torchrun, WORLD_SIZE > 1, else local).")
@click.option("--backend", type=click.Choice(("auto", "nccl", "gloo")), default="auto",
              show_default=True,
              help="Sharded placement: torch.distributed backend (auto: NCCL on CUDA, gloo on "
                   "CPU).")
@click.option("--consolidate/--no-consolidate", default=True,
              help="Sharded placement: also write one normal model directory (default) beside "
                   "the per-rank label shards in --out/sharded.")
@threads_option
@text_field_options
@zero_based_option
@_featurizer_options
@_config_options
def train(data: Path | None, val: Path | None, out: Path | None, config_file: Path | None,
          resume: Path | None, force: bool, print_config: bool, progress: bool | None,
          as_json: bool, labels_file: Path | None, label_names: Path | None,
          init_from: Path | None, ignore_extra: bool, placement: str, backend: str,
          consolidate: bool, text_field: str,
          label_field: str, label_sep: str, threads: int, **flags: Any) -> None:
    """Train a model: EmbeddingBag + MLP encoder, full or sampled softmax (MIDX).

    \b
    xmc train --data train.jsonl --out runs/kjv          # raw text: featurizer fitted and kept
    xmc train --data train.txt --out runs/bibtex
    xmc train --data train.txt --out runs/big --loss sampled --sampler midx --negatives 32
    xmc train --resume runs/big                         # continue an interrupted run
    xmc train --print-config > cfg.json; xmc train --config cfg.json --data train.txt --out r
    xmc train --init-from runs/bibtex --data grown.txt --label-names names.txt --out runs/b2
    torchrun --nproc-per-node 2 -m xmc_toolkit.train --data train.txt --out runs/sharded

    \b
    --out must be new or empty: a directory holding a model is refused unless --force
    (replace it) or --resume (continue it). The directory is locked while training; a second
    `xmc train` into it fails at once, naming the first one's pid. A refused command changes
    nothing on disk.
    """
    from xmc_toolkit.featurizer import FeaturizerConfig

    TrainConfig = _config_cls()
    feat_names = {f.name for f in dataclasses.fields(FeaturizerConfig)}
    feat_flags = {k: v for k, v in flags.items() if k in feat_names}
    flags = {k: v for k, v in flags.items() if k not in feat_names}
    base = TrainConfig()
    feat_base = FeaturizerConfig()
    run: dict[str, Any] = {}
    base_choice = zero_based()
    saved_run: dict[str, Any] | None = None  # run.json of --resume, read once
    if resume is not None and (init_from is None and label_names is None):
        if (resume / RUN_FILE).is_file():
            saved_run = _read_run(resume)
            if saved_run.get("init_from"):
                init_from = Path(saved_run["init_from"])
                ignore_extra = ignore_extra or bool(saved_run.get("ignore_extra"))
            if saved_run.get("label_names"):
                label_names = Path(saved_run["label_names"])
    placement = resolve_placement(placement)
    if placement == "sharded" and init_from is not None:
        raise click.UsageError("--init-from is not available with the sharded placement "
                               "(torchrun) yet; grow the model in one process "
                               "(--placement local)")
    if placement == "local" and (backend != "auto" or not consolidate):
        raise click.UsageError("--backend and --no-consolidate apply to the sharded placement "
                               "only (torchrun, or --placement sharded)")
    if init_from is not None:
        _train_init_from(init_from, data, val, out, config_file, resume, print_config, progress,
                         as_json, label_names, ignore_extra, flags, saved_run)
        return
    if ignore_extra:
        raise click.UsageError("--ignore-extra applies only with --init-from")
    if resume is not None:
        run = saved_run if saved_run is not None else _read_run(resume)
        if base_choice == "auto" and run.get("zero_based") in (True, False):
            base_choice = run["zero_based"]
        saved = dict(run.get("config", {}))
        saved.pop("max_steps", None)  # a pause point of the earlier call, not of this one
        base = base.merged(saved, validate=False)
        if out is not None and Path(out) != Path(resume):
            raise click.UsageError("--resume DIR writes to DIR; drop --out")
        out = resume
        data = data or (Path(run["data"]) if run.get("data") else None)
        val = val or (Path(run["val"]) if run.get("val") else None)
        text = run.get("text") or {}
        if text:
            feat_base = feat_base.merged(text.get("featurizer", {}), validate=False)
            text_field = text.get("text_field", text_field)
            label_field = text.get("label_field", label_field)
            label_sep = text.get("label_sep", label_sep)
        if run.get("label_names") and label_names is None:
            label_names = Path(run["label_names"])
        if run.get("labels") and labels_file is None:
            labels_file = Path(run["labels"])
    feat_from_file = False
    if config_file is not None:
        from xmc_toolkit.config import read_config_json

        raw = read_config_json(config_file)
        feat_part = raw.pop(FEATURIZER_KEY, None)
        file_cfg = TrainConfig.from_dict(raw, validate=False)
        base = base.merged(file_cfg.to_dict(), validate=False)
        if feat_part is not None:
            if not isinstance(feat_part, dict):
                raise click.UsageError(f"{config_file}: {FEATURIZER_KEY!r} must be a JSON "
                                       "object of featurizer settings (as --print-config writes)")
            feat_base = feat_base.merged(FeaturizerConfig.from_dict(
                feat_part, validate=False).to_dict(), validate=False)
            feat_from_file = True
    cfg = base.merged(flags, validate=print_config or data is None)
    feat_cfg = feat_base.merged(feat_flags)
    if print_config:
        from xmc_toolkit.inputs import is_text_file

        printed = cfg.to_dict()
        if (feat_from_file or any(v is not None for v in feat_flags.values())
                or (data is not None and is_text_file(data))):
            printed[FEATURIZER_KEY] = feat_cfg.to_dict()
        click.echo(json.dumps(printed, indent=2))
        return
    if data is None:
        raise click.UsageError("--data is required (the training data set)")
    if out is None:
        raise click.UsageError("--out is required (the model directory to write)")

    from xmc_toolkit._fileio import atomic_write_text
    from xmc_toolkit.inputs import (TextFields, is_text_file, load_training_data,
                                    load_validation_data)
    from xmc_toolkit.train import Trainer, TrainingInterrupted

    apply_threads(threads)

    text_data = is_text_file(data)
    if placement == "sharded" and text_data:
        raise click.UsageError("raw-text training data is not available with the sharded "
                               "placement yet; featurize it first (xmc data convert) or train in "
                               "one process")
    given = [("--" + k.replace("_", "-")) for k, v in feat_flags.items() if v is not None]
    if feat_from_file:
        given.append(f"the {FEATURIZER_KEY!r} block of {config_file}")
    if not text_data and given:
        raise click.UsageError(f"{', '.join(given)} apply only to raw-text training data "
                               "(.jsonl/.tsv/.csv)")
    fields = TextFields(text_field, label_field, label_sep)
    train_ds, featurizer = load_training_data(
        data, feat_cfg if text_data else None, fields=fields, label_names_from=label_names,
        labels_from=labels_file, zero_based=base_choice,
        holdout=(cfg.val_fraction, cfg.seed) if val is None else None)
    # every config problem, data-dependent ones included, at once and before any work
    cfg.validate_for_data(train_ds.num_points, train_ds.num_features, train_ds.num_labels)
    val_ds = None if val is None else load_validation_data(val, train_ds, featurizer,
                                                           fields=fields,
                                                           zero_based=base_choice)
    record: dict[str, Any] = {
        "data": str(Path(data).resolve()), "val": str(Path(val).resolve()) if val else None,
        "zero_based": None if base_choice == "auto" else base_choice,
        "config": cfg.to_dict()}
    if featurizer is not None:
        record["text"] = {"featurizer": feat_cfg.to_dict(), "text_field": text_field,
                          "label_field": label_field, "label_sep": label_sep}
    if label_names is not None:
        record["label_names"] = str(Path(label_names).resolve())
    if labels_file is not None:
        record["labels"] = str(Path(labels_file).resolve())
    show = sys.stderr.isatty() if progress is None else progress
    run_doc = json.dumps(record, indent=2)

    def write_run(event: str, payload: dict[str, Any]) -> None:
        # written once training is accepted (a resume's config and data are checked first), so
        # a refused command leaves run.json as it was
        if event == "train_begin":
            atomic_write_text(out / RUN_FILE, run_doc)

    ctx, place = None, None
    if placement == "sharded":  # every rank runs this command; rank 0 reports
        from xmc_toolkit.distributed import init_distributed
        from xmc_toolkit.placement import ShardedPlacement

        ctx = init_distributed(cfg.device, backend)
        place = ShardedPlacement(ctx, consolidate)
        show = show and ctx.is_main
        if not ctx.is_main:
            write_run = _ignore_events  # rank 0 writes run.json
    # the trainer locks --out, checks it (refused over earlier work unless --force) and the
    # resumed checkpoint's config and data, all before writing anything
    try:
        result = Trainer(cfg, out_dir=out, callbacks=[write_run], featurizer=featurizer,
                         placement=place).fit(
            train_ds, val_ds, show_progress=show, resume=resume is not None, force=force)
    except TrainingInterrupted as exc:  # Ctrl-C / SIGTERM: checkpoint saved, clean exit
        click.echo(str(exc), err=True)
        sys.exit(128 + exc.signum)  # 130 for SIGINT, 143 for SIGTERM
    finally:
        if ctx is not None and ctx.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if ctx is not None and not ctx.is_main:
        return
    extra = None
    if featurizer is not None:
        extra = {"featurizer": {"num_features": featurizer.num_features,
                                "num_labels": train_ds.num_labels}}
        if not as_json:
            click.echo(f"featurized {train_ds.num_points} texts: {featurizer.num_features} "
                       f"features, {train_ds.num_labels} labels")
    if ctx is not None:
        extra = {**(extra or {}), "world_size": ctx.world_size}
    _report(result, out, cfg, as_json, extra=extra)


def resolve_placement(placement: str) -> str:
    """``auto`` -> ``sharded`` under torchrun (``WORLD_SIZE > 1``), else ``local``."""
    import os

    if placement != "auto":
        return placement
    return "sharded" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local"


def _ignore_events(event: str, payload: dict[str, Any]) -> None:
    """The callback of the ranks other than 0 (rank 0 writes run.json)."""


def _train_init_from(init_from: Path, data: Path | None, val: Path | None, out: Path | None,
                     config_file: Path | None, resume: Path | None, print_config: bool,
                     progress: bool | None, as_json: bool, label_names: Path | None,
                     ignore_extra: bool, flags: dict[str, Any],
                     saved_run: dict[str, Any] | None = None) -> None:
    """``xmc train --init-from DIR``: grow DIR's label set by --data's labels and fine-tune.

    ``saved_run``: ``--resume``'s ``run.json`` when the caller has read it already.
    """
    from xmc_toolkit import grow
    from xmc_toolkit.model_dir import load_model_dir
    from xmc_toolkit.train import TrainingInterrupted

    run: dict[str, Any] = {}
    if config_file is not None:  # the file's fields over the parent's config, flags over both
        parent_cfg = load_model_dir(init_from, device="cpu").config
        flags = {**grow.config_file_overrides(config_file, parent_cfg),
                 **{k: v for k, v in flags.items() if v is not None}}
    if resume is not None:
        run = saved_run if saved_run is not None else _read_run(resume)
        if out is not None and Path(out) != Path(resume):
            raise click.UsageError("--resume DIR writes to DIR; drop --out")
        out = resume
        data = data or (Path(run["data"]) if run.get("data") else None)
        val = val or (Path(run["val"]) if run.get("val") else None)
        saved = dict(run.get("overrides", {}))
        saved.pop("max_steps", None)  # a pause point of the earlier call, not of this one
        flags = {**saved, **{k: v for k, v in flags.items() if v is not None}}
    overrides = {k: v for k, v in flags.items() if v is not None}

    if print_config:
        parent = load_model_dir(init_from, device="cpu")
        cfg = grow.child_config(parent.config, overrides, sampler_state=parent.sampler_state,
                                num_points=load_data(data).num_points if data else None)
        click.echo(cfg.to_json())
        return
    if data is None:
        raise click.UsageError("--data is required (the training data set, every label)")
    if out is None:
        raise click.UsageError("--out is required (the model directory to write)")
    grow.check_out_dir(init_from, out)
    # load_data: with the command's --zero-based/--one-based, as the plain training path
    train_ds = load_data(data, label_names_from=label_names)
    val_ds = load_data(val, label_names_from=label_names) if val is not None else None
    show = sys.stderr.isatty() if progress is None else progress

    def before_training(cfg: Any) -> None:  # everything checked: now the output may be written
        from xmc_toolkit._fileio import atomic_write_text

        atomic_write_text(out / RUN_FILE, json.dumps({
            "data": str(Path(data).resolve()), "val": str(Path(val).resolve()) if val else None,
            "label_names": str(Path(label_names).resolve()) if label_names else None,
            "init_from": str(Path(init_from).resolve()), "ignore_extra": ignore_extra,
            "overrides": {k: list(v) if isinstance(v, tuple) else v
                          for k, v in overrides.items()},
            "config": cfg.to_dict()}, indent=2))

    try:
        result, growth, trainer = grow.train_from(
            init_from, train_ds, out, overrides, val=val_ds, ignore_extra=ignore_extra,
            data_path=str(data), val_path=None if val is None else str(val),
            show_progress=show, resume=resume is not None, before_training=before_training)
    except TrainingInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(128 + exc.signum)
    m = growth.match
    if not as_json:
        click.echo(f"grown from {init_from}: {m.num_old} labels + {m.num_new} new (matched by "
                   f"{m.by}) = {m.num_labels}")
    _report(result, out, trainer.config, as_json,
            extra={"init_from": str(init_from), "labels_added": m.num_new,
                   "num_labels": m.num_labels})


def _report(result: Any, out: Path, cfg: Any, as_json: bool,
            extra: dict[str, Any] | None = None) -> None:
    summary = {"out": str(out), "loss": result.loss, "sampler": result.sampler,
               "epochs": len(result.history), "steps": result.steps,
               "seconds": round(result.seconds, 2), "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "val": result.best, **(extra or {})}
    summary["paused"] = result.paused
    if as_json:
        click.echo(json.dumps(summary))
        return
    if result.paused:
        click.echo(f"paused at step {result.steps} (--max-steps {cfg.max_steps}) after "
                   f"{summary['epochs']} complete epoch(s); checkpoint saved: continue with "
                   f"xmc train --resume {out}")
        return
    click.echo(f"trained {summary['epochs']} epochs ({result.steps} steps, "
               f"{result.seconds:.1f} s), loss={result.loss}"
               + (f" sampler={result.sampler}" if result.sampler else "")
               + (f", final train loss {summary['final_loss']:.4f}"
                  if summary["final_loss"] is not None else ""))
    if result.best:
        from cli._format import metrics_lines, metrics_table

        ks = range(1, max(cfg.ks) + 1)
        if sys.stdout.isatty():
            from rich.console import Console

            Console().print(metrics_table(result.best, ks,
                                          title=f"validation (epoch {result.best_epoch})"))
        else:
            click.echo(f"validation (epoch {result.best_epoch}):")
            click.echo(metrics_lines(result.best, ks))
    click.echo(f"model written to {out}")


@click.command("predict")
@click.option("--model", "model", type=_MODEL, required=True, help="Model directory.")
@click.option("--data", "data", type=_DATASET, default=None,
              help="Data set to predict: raw text (.jsonl/.tsv/.csv, labels optional) for a "
                   "model trained on text, else the model's feature format.")
@click.option("--text", "texts", multiple=True,
              help="A document to predict (repeatable); '-' reads standard input, one text a "
                   "line, and writes one JSONL line per text as it arrives.")
@click.option("--topk", "topk", type=click.IntRange(min=1), default=5, show_default=True,
              help="Labels per point.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Prediction file: text (id:score ...), .jsonl (ids, scores, label names) or "
                   ".npz (CSR score matrix [N, L], PECOS/pyxclib); default: JSONL on standard "
                   "output.")
@click.option("--approx", is_flag=True,
              help="Approximate top-k (see --approx-backend); reports its measured recall vs "
                   "the exact top-k of the same rows.")
@click.option("--approx-backend", type=click.Choice(["auto", "hnsw", "faiss-ivf", "midx"]),
              default="auto", show_default=True,
              help="auto: an ANN index (faiss, else hnswlib; pip install 'xmc-toolkit[ann]') "
                   "over the bias-folded label vectors, else the MIDX index.")
@click.option("--approx-effort", type=click.IntRange(min=1), default=None,
              help="Search effort of hnsw (ef) / faiss-ivf (nprobe) with --approx.")
@click.option("--num-cells", type=click.IntRange(min=1), default=16, show_default=True,
              help="MIDX cells probed per point with --approx (MIDX backend).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Labels scored at once (lower it when out of memory).")
@click.option("--ignore-extra", is_flag=True,
              help="Drop features/labels the model does not know instead of failing.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar.")
@click.option("--probability", type=click.Choice(["softmax", "sigmoid"]), default=None,
              help="Add each label's probability to JSONL output: softmax = its share of the "
                   "softmax over all labels; sigmoid = 1/(1+exp(-score)), one-vs-all.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Keep only the top-k labels whose probability (--probability, default "
                   "softmax) is at least this value.")
@threads_option
@model_text_field_options
@no_verify_option
@zero_based_option
def predict(model: Path, data: Path | None, texts: tuple[str, ...], topk: int, out: Path | None,
            approx: bool, approx_backend: str, approx_effort: int | None, num_cells: int,
            device: str, chunk_size: int, ignore_extra: bool, progress: bool | None,
            probability: str | None, threshold: float | None, threads: int,
            text_field: str | None, label_field: str | None, label_sep: str | None,
            no_verify: bool) -> None:
    """Write the top-k labels of every point of --data, or of --text documents.

    \b
    xmc predict --model runs/kjv --data test.jsonl --out pred.jsonl
    xmc predict --model runs/kjv --text "In the beginning God created the heaven"
    cat verses.txt | xmc predict --model runs/kjv --text - --topk 3   # one JSONL line each
    xmc predict --model runs/bibtex --data test.txt --topk 5 --out pred.txt
    xmc predict --model runs/big --data test.txt --out pred.txt --approx
    """
    from xmc_toolkit.data.predictions import (check_predictions_path, jsonl_lines,
                                              write_predictions)

    if (data is None) == (not texts):
        raise click.UsageError("give exactly one of --data FILE or --text TEXT (--text - reads "
                               "standard input)")
    if out is not None and str(out) != "-":
        check_predictions_path(out)  # before the work, not after it
    apply_threads(threads)
    if texts:
        _predict_texts(model, texts, topk, out, approx, num_cells, device, chunk_size,
                       probability, threshold, verify=not no_verify)
        return
    from xmc_toolkit.evaluate import predict_model_dir

    show = sys.stderr.isatty() if progress is None else progress
    res = predict_model_dir(model, data, topk, approx=approx, num_cells=num_cells,
                            approx_backend=approx_backend, approx_effort=approx_effort,
                            device=device,
                            chunk_size=chunk_size, ignore_extra=ignore_extra,
                            show_progress=show,
                            fields=given_fields(text_field, label_field, label_sep),
                            probability=probability, threshold=threshold,
                            verify=not no_verify, zero_based=zero_based())
    extra = _probability_fields(res["probabilities"])
    if out is None or str(out) == "-":
        for line in jsonl_lines(res["ids"], res["scores"], res["label_names"], extra=extra):
            sys.stdout.write(line)
    else:
        write_predictions(out, res["ids"], res["scores"], label_names=res["label_names"],
                          extra=extra, num_labels=res["num_labels"])
        click.echo(f"wrote top-{topk} predictions of {res['ids'].shape[0]} points to {out}")
    if res["recall_vs_exact"] is not None:
        click.echo(f"approximate top-{topk} ({res['approx_backend']}) recall vs exact: "
                   f"{res['recall_vs_exact']:.4f}"
                   + (f" ({res['approx_note']})" if res.get("approx_note") else ""),
                   err=out is None)


def _probability_fields(probs: Any) -> list[dict[str, Any]] | None:
    """The ``probabilities`` field of each JSONL line (when asked for or thresholded on)."""
    if probs is None:
        return None
    return [{"probabilities": row} for row in probs]


def _predict_texts(model_dir: Path, texts: tuple[str, ...], k: int, out: Path | None,
                   approx: bool, num_cells: int, device: str, chunk_size: int,
                   probability: str | None, threshold: float | None, *,
                   verify: bool = True) -> None:
    """``--text``: documents from the command line, or streamed from standard input."""
    from xmc_toolkit.data.predictions import jsonl_lines, write_predictions
    from xmc_toolkit.errors import DataFormatError
    from xmc_toolkit.evaluate import apply_threshold, predict_topk, probabilities
    from xmc_toolkit.inputs import featurize_texts
    from xmc_toolkit.model_dir import load_model_dir

    if "-" in texts and len(texts) > 1:
        raise click.UsageError("--text - (standard input) cannot be combined with other --text")
    m = load_model_dir(model_dir, device=device, verify=verify)  # once, also for a stream
    k = min(k, m.num_labels)

    def run(batch: list[str]) -> tuple[Any, Any, Any]:
        X = featurize_texts(m, batch)
        ids, scores = predict_topk(m, X, k, chunk_size=chunk_size, approx=approx,
                                   num_cells=num_cells)
        probs = None
        if probability is not None or threshold is not None:
            probs = probabilities(m, X, scores, probability or "softmax", chunk_size=chunk_size)
            if threshold is not None:
                ids = apply_threshold(ids, probs, threshold)
        return ids, scores, _probability_fields(probs)

    if texts != ("-",):
        for i, t in enumerate(texts):
            if not t.strip():
                raise DataFormatError("--text", i + 1, "empty text; give a document to predict")
        ids, scores, extra = run(list(texts))
        if out is not None and str(out) != "-":
            write_predictions(out, ids, scores, label_names=m.label_names, extra=extra,
                              num_labels=m.num_labels)
            click.echo(f"wrote top-{k} predictions of {len(texts)} texts to {out}")
        else:
            sys.stdout.writelines(jsonl_lines(ids, scores, m.label_names, extra=extra))
        return
    if out is not None and str(out) != "-":
        raise click.UsageError("--text - writes to standard output; drop --out")
    from xmc_toolkit.data.text import iter_text_lines

    stdin = sys.stdin.buffer
    for number, line in iter_text_lines(stdin, "<stdin>"):
        if not line.strip():
            raise DataFormatError("<stdin>", number, "empty line: give one text a line")
        ids, scores, extra = run([line])
        sys.stdout.write(jsonl_lines(ids, scores, m.label_names, extra=extra)[0])
        sys.stdout.flush()


@click.command("export")
@click.option("--model", "model", type=_MODEL, required=True, help="Model directory.")
@click.option("--what", type=click.Choice(["labels", "instances"]), required=True,
              help="labels: the [L, d] label table; instances: query embeddings of --data.")
@click.option("--data", "data", type=_DATASET, default=None,
              help="Data set (with --what instances).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file, .safetensors or .npy.")
@click.option("--normalize", is_flag=True, help="L2-normalize rows (cosine search).")
@click.option("--fold-bias", is_flag=True,
              help="Append a last column: labels get their bias, instances a 1, so that the "
                   "inner product of the two includes the bias.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--ignore-extra", is_flag=True,
              help="Drop features the model does not know instead of failing (instances).")
@no_verify_option
@zero_based_option
def export(model: Path, what: str, data: Path | None, out: Path, normalize: bool,
           fold_bias: bool, device: str, ignore_extra: bool, no_verify: bool) -> None:
    """Export label or instance embeddings for nearest-neighbour libraries.

    \b
    xmc export --model runs/bibtex --what labels --out labels.safetensors
    xmc export --model runs/bibtex --what instances --data test.txt --out q.npy --normalize
    """
    from xmc_toolkit.export import export_embeddings
    from xmc_toolkit.model import XMCModel

    if what == "instances" and data is None:
        raise click.UsageError("--what instances needs --data")
    if what == "labels" and data is not None:
        raise click.UsageError("--data applies only with --what instances")
    from xmc_toolkit.export import check_export_path

    check_export_path(out)  # before the work, not after it
    m = XMCModel.load(model, device=device, verify=not no_verify)
    names = None
    if what == "labels":
        emb = m.label_embeddings()
        if fold_bias:
            from xmc_toolkit.export import fold_bias as fold

            emb = fold(emb, m.label_bias())
        names = m.label_names
    else:
        from xmc_toolkit.inputs import is_text_file, load_for_model

        fitted = m.fitted
        if is_text_file(data):  # texts through the model's featurizer; labels play no part
            ds = load_for_model(data, fitted, labels_required=False)
        else:
            from xmc_toolkit.evaluate import align_dataset

            ds = load_data(data)  # only the feature space matters for instance embeddings
            ds = align_dataset(ds, fitted.num_features, ds.num_labels,
                               ignore_extra=ignore_extra, path=str(data))
        emb = m.encode(ds.X)
        if fold_bias:
            from xmc_toolkit.export import augment_queries

            emb = augment_queries(emb)
    path = export_embeddings(emb, out, normalize=normalize, names=names,
                             metadata={"what": what, "model": str(model)})
    click.echo(f"wrote {emb.shape[0]} x {emb.shape[1]} {what} embeddings to {path}")


COMMANDS = [train, predict, export]
