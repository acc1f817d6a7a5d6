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

from xmc_toolkit.errors import ConfigError

__all__ = ["COMMANDS", "train", "predict", "export"]

_DATA = click.Path(exists=True, dir_okay=False, path_type=Path)
_MODEL = click.Path(path_type=Path)
RUN_FILE = "run.json"


def _config_cls() -> Any:
    # xmc_toolkit.train imports torch; import it when a command runs, not at CLI start.
    from xmc_toolkit.train import TrainConfig

    return TrainConfig


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in str(text).replace(" ", "").split(",") if t)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} must be comma-separated integers, e.g. 1,3,5") \
            from exc


def _config_options(func: Any) -> Any:
    """Add one option per TrainConfig field (default ``None``: "not given")."""
    from xmc_toolkit.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in reversed(dataclasses.fields(TrainConfig)):
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


@click.command("train")
@click.option("--data", "data", type=_DATA, help="Training data set (any supported format).")
@click.option("--val", "val", type=_DATA, default=None,
              help="Validation data set (same feature/label space); default: none, or "
                   "--val-fraction of the training rows.")
@click.option("--out", "out", type=_MODEL, default=None,
              help="Output model directory (weights, config, metrics.jsonl, checkpoint/).")
@click.option("--config", "config_file", type=_DATA, default=None,
              help="JSON file of TrainConfig values (flags override it).")
@click.option("--resume", "resume", type=_MODEL, default=None,
              help="Continue the interrupted run in this directory exactly (same data/config).")
@click.option("--print-config", is_flag=True,
              help="Print the merged config (every default) as JSON and exit.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--init-from", "init_from", type=_MODEL, default=None,
              help="Start from this trained model directory: its encoder, label rows and "
                   "optimizer state are kept, labels of --data it does not know are added "
                   "(matched by name when both carry names, else by id) and the model is "
                   "fine-tuned on --data for --epochs (default 2). The directory is only read.")
@click.option("--label-names", "label_names", type=_DATA, default=None,
              help="Label names of --data and --val (Mulan XML or one name a line, in id "
                   "order); kept with the model, used by --init-from to match labels.")
@click.option("--ignore-extra", is_flag=True,
              help="With --init-from: cut (or pad) --data's feature columns to the model's "
                   "instead of failing.")
@_config_options
def train(data: Path | None, val: Path | None, out: Path | None, config_file: Path | None,
          resume: Path | None, print_config: bool, progress: bool | None, as_json: bool,
          init_from: Path | None, label_names: Path | None, ignore_extra: bool,
          **flags: Any) -> None:
    """Train a model: EmbeddingBag + MLP encoder, full or sampled softmax (MIDX).

    \b
    xmc train --data train.txt --out runs/bibtex
    xmc train --data train.txt --out runs/big --loss sampled --sampler midx --negatives 32
    xmc train --resume runs/big                         # continue an interrupted run
    xmc train --print-config > cfg.json; xmc train --config cfg.json --data train.txt --out r
    xmc train --init-from runs/bibtex --data grown.txt --label-names names.txt --out runs/b2
    """
    TrainConfig = _config_cls()
    base = TrainConfig()
    run: dict[str, Any] = {}
    if resume is not None and (init_from is None and label_names is None):
        run_file = resume / RUN_FILE
        if run_file.is_file():
            saved_run = json.loads(run_file.read_text())
            if saved_run.get("init_from"):
                init_from = Path(saved_run["init_from"])
                ignore_extra = ignore_extra or bool(saved_run.get("ignore_extra"))
            if saved_run.get("label_names"):
                label_names = Path(saved_run["label_names"])
    if init_from is not None:
        _train_init_from(init_from, data, val, out, config_file, resume, print_config, progress,
                         as_json, label_names, ignore_extra, flags)
        return
    if resume is not None:
        run_file = resume / RUN_FILE
        if not run_file.is_file():
            raise ConfigError(f"{str(resume)!r} is not a training run directory ({RUN_FILE} is "
                              "missing); pass the --out directory of an earlier `xmc train`")
        run = json.loads(run_file.read_text())
        saved = dict(run.get("config", {}))
        saved.pop("max_steps", None)  # a pause point of the earlier call, not of this one
        base = base.merged(saved, validate=False)
        if out is not None and Path(out) != Path(resume):
            raise click.UsageError("--resume DIR writes to DIR; drop --out")
        out = resume
        data = data or (Path(run["data"]) if run.get("data") else None)
        val = val or (Path(run["val"]) if run.get("val") else None)
    if config_file is not None:
        file_cfg = TrainConfig.from_json(config_file, validate=False)
        base = base.merged(file_cfg.to_dict(), validate=False)
    cfg = base.merged(flags, validate=print_config or data is None)
    if print_config:
        click.echo(cfg.to_json())
        return
    if data is None:
        raise click.UsageError("--data is required (the training data set)")
    if out is None:
        raise click.UsageError("--out is required (the model directory to write)")

    from xmc_toolkit.data import load
    from xmc_toolkit.train import Trainer

    train_ds = load(data, label_names_from=label_names)
    # every config problem, data-dependent ones included, at once and before any work
    cfg.validate_for_data(train_ds.num_points, train_ds.num_features, train_ds.num_labels)
    val_ds = load(val, label_names_from=label_names) if val is not None else None
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({
        "data": str(Path(data).resolve()), "val": str(Path(val).resolve()) if val else None,
        "label_names": str(Path(label_names).resolve()) if label_names else None,
        "config": cfg.to_dict()}, indent=2))
    show = sys.stderr.isatty() if progress is None else progress
    from xmc_toolkit.train import TrainingInterrupted

    try:
        result = Trainer(cfg, out_dir=out).fit(train_ds, val_ds, show_progress=show,
                                               resume=resume is not None)
    except TrainingInterrupted as exc:  # Ctrl-C: checkpoint saved, clean exit (status 130)
        click.echo(str(exc), err=True)
        sys.exit(130)
    _report(result, out, cfg, as_json)


def _train_init_from(init_from: Path, data: Path | None, val: Path | None, out: Path | None,
                     config_file: Path | None, resume: Path | None, print_config: bool,
                     progress: bool | None, as_json: bool, label_names: Path | None,
                     ignore_extra: bool, flags: dict[str, Any]) -> None:
    """``xmc train --init-from DIR``: grow DIR's label set by --data's labels and fine-tune."""
    from xmc_toolkit import grow
    from xmc_toolkit.train import TrainingInterrupted, load_model_dir

    if config_file is not None:
        raise click.UsageError("--config does not combine with --init-from: the grown model "
                               "takes its parent's config; change single values with flags")
    run: dict[str, Any] = {}
    if resume is not None:
        run = json.loads((resume / RUN_FILE).read_text())
        if out is not None and Path(out) != Path(resume):
            raise click.UsageError("--resume DIR writes to DIR; drop --out")
        out = resume
        data = data or (Path(run["data"]) if run.get("data") else None)
        val = val or (Path(run["val"]) if run.get("val") else None)
        saved = dict(run.get("overrides", {}))
        saved.pop("max_steps", None)  # a pause point of the earlier call, not of this one
        flags = {**saved, **{k: v for k, v in flags.items() if v is not None}}
    overrides = {k: v for k, v in flags.items() if v is not None}
    from xmc_toolkit.data import load

    if print_config:
        parent = load_model_dir(init_from, device="cpu")
        cfg = grow.child_config(parent.config, overrides, sampler_state=parent.sampler_state,
                                num_points=load(data).num_points if data else None)
        click.echo(cfg.to_json())
        return
    if data is None:
        raise click.UsageError("--data is required (the training data set, every label)")
    if out is None:
        raise click.UsageError("--out is required (the model directory to write)")
    grow.check_out_dir(init_from, out)
    train_ds = load(data, label_names_from=label_names)
    val_ds = load(val, label_names_from=label_names) if val is not None else None
    show = sys.stderr.isatty() if progress is None else progress

    def before_training(cfg: Any) -> None:  # everything checked: now the output may be written
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps({
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
        sys.exit(130)
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
    if as_json:
        click.echo(json.dumps(summary))
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
@click.option("--data", "data", type=_DATA, required=True, help="Data set to predict.")
@click.option("--topk", "topk", type=click.IntRange(min=1), default=5, show_default=True,
              help="Labels per point.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Prediction file: text (id:score ...) or .jsonl (ids, scores, label names).")
@click.option("--approx", is_flag=True,
              help="Approximate top-k through the MIDX index (reports recall vs exact).")
@click.option("--num-cells", type=click.IntRange(min=1), default=16, show_default=True,
              help="MIDX cells probed per point with --approx.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Labels scored at once (lower it when out of memory).")
@click.option("--ignore-extra", is_flag=True,
              help="Drop features/labels the model does not know instead of failing.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar.")
def predict(model: Path, data: Path, topk: int, out: Path, approx: bool, num_cells: int,
            device: str, chunk_size: int, ignore_extra: bool, progress: bool | None) -> None:
    """Write the top-k labels of every point of --data.

    \b
    xmc predict --model runs/bibtex --data test.txt --topk 5 --out pred.jsonl
    xmc predict --model runs/big --data test.txt --out pred.txt --approx
    """
    from xmc_toolkit.data.predictions import write_predictions
    from xmc_toolkit.evaluate import predict_model_dir

    show = sys.stderr.isatty() if progress is None else progress
    res = predict_model_dir(model, data, topk, approx=approx, num_cells=num_cells, device=device,
                            chunk_size=chunk_size, ignore_extra=ignore_extra,
                            show_progress=show)
    write_predictions(out, res["ids"], res["scores"], label_names=res["label_names"])
    click.echo(f"wrote top-{topk} predictions of {res['ids'].shape[0]} points to {out}")
    if res["recall_vs_exact"] is not None:
        click.echo(f"approximate top-{topk} recall vs exact: {res['recall_vs_exact']:.4f}")


@click.command("export")
@click.option("--model", "model", type=_MODEL, required=True, help="Model directory.")
@click.option("--what", type=click.Choice(["labels", "instances"]), required=True,
              help="labels: the [L, d] label table; instances: query embeddings of --data.")
@click.option("--data", "data", type=_DATA, default=None, help="Data set (with --what instances).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file, .safetensors or .npy.")
@click.option("--normalize", is_flag=True, help="L2-normalize rows (cosine search).")
@click.option("--fold-bias", is_flag=True,
              help="Labels: append the bias as a last column (pair with queries + a column of 1).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--ignore-extra", is_flag=True,
              help="Drop features the model does not know instead of failing (instances).")
def export(model: Path, what: str, data: Path | None, out: Path, normalize: bool,
           fold_bias: bool, device: str, ignore_extra: bool) -> None:
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
    m = XMCModel.load(model, device=device)
    names = None
    if what == "labels":
        emb = m.label_embeddings()
        if fold_bias:
            from xmc_toolkit.export import fold_bias as fold

            emb = fold(emb, m.label_bias())
        names = m.label_names
    else:
        from xmc_toolkit.data import load
        from xmc_toolkit.evaluate import align_dataset

        fitted = m.fitted
        ds = load(data)  # only the feature space matters for instance embeddings
        ds = align_dataset(ds, fitted.num_features, ds.num_labels, ignore_extra=ignore_extra,
                           path=str(data))
        emb = m.encode(ds.X)
    path = export_embeddings(emb, out, normalize=normalize, names=names,
                             metadata={"what": what, "model": str(model)})
    click.echo(f"wrote {emb.shape[0]} x {emb.shape[1]} {what} embeddings to {path}")


COMMANDS = [train, predict, export]
