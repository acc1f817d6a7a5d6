"""``xmc eval``: evaluate a prediction file against labels, or a trained model on a data set.

Two modes:

* ``xmc eval --predictions P --labels Y [--train-labels T] [-A 0.55 -B 1.5] [--k 5] [--json]``
* ``xmc eval --model DIR --data TEST [--k 5] [--json] [--device auto] [--chunk-size N]
  [--ignore-extra]``
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from cli._format import metrics_json, metrics_lines, metrics_table
from cli._options import (given_fields, model_text_field_options, no_verify_option, zero_based,
                          zero_based_option)

__all__ = ["COMMANDS", "eval_"]

logger = logging.getLogger(__name__)

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
# Data sets may be split prefixes or folders: the loader checks them and names the problem.
_DATA = click.Path(path_type=Path)


def _load_labels(path: Path) -> Any:
    """Labels ``Y`` csr ``[N, L]`` of any file supported by ``xmc_toolkit.data.load``."""
    from cli._options import load_data

    return load_data(path).Y


def _compact_labels(Y: Any, Y_train: Any, ids: Any) -> tuple[Any, Any, Any]:
    """Renumber labels to those that occur when ``L`` dwarfs the stored entries.

    Every metric (PSP included: a label's propensity depends only on its own count and ``N``)
    is unchanged by renaming labels, so the per-label arrays of the metrics follow the data,
    not ``L``, which one huge label id in a headerless file can make 2^31 (a 16 GiB count
    array). Predicted ids beyond ``L`` are left for the metrics' own range check.
    """
    import numpy as np
    import scipy.sparse as sp

    L = Y.shape[1]
    parts = [Y.indices, ids[ids >= 0]] + ([Y_train.indices] if Y_train is not None else [])
    if L <= 4 * sum(len(p) for p in parts) + 65536 or (ids >= L).any():
        return Y, Y_train, ids
    used = np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))

    def remap(M: Any) -> Any:
        return sp.csr_matrix((M.data, np.searchsorted(used, M.indices), M.indptr),
                             shape=(M.shape[0], len(used)))

    new_ids = np.where(ids >= 0, np.searchsorted(used, np.maximum(ids, 0)), ids)
    logger.info("evaluating over the %d labels that occur (of L=%d)", len(used), L)
    return remap(Y), None if Y_train is None else remap(Y_train), new_ids


def _evaluate_predictions(
    predictions: Path,
    labels: Path,
    train_labels: Path | None,
    prop_a: float,
    prop_b: float,
    k: int,
    sort_by_score: bool,
) -> dict[str, Any]:
    from xmc_toolkit.data.predictions import read_predictions
    from xmc_toolkit.metrics import MetricsInputError, evaluate, inverse_propensity

    ids, _ = read_predictions(predictions, sort_by_score=sort_by_score)
    Y = _load_labels(labels)
    n, num_labels = Y.shape
    if ids.shape[0] != n:
        raise MetricsInputError(
            f"{predictions} has {ids.shape[0]} prediction lines but {labels} has {n} points; "
            "both must list the same points in the same order (one line per point)"
        )
    if ids.shape[1] < k:
        raise MetricsInputError(
            f"{predictions} holds at most {ids.shape[1]} predicted labels per point but --k is "
            f"{k}; evaluate with --k {max(ids.shape[1], 1)} or predict more labels per point"
        )
    if train_labels is not None:
        Y_train = _load_labels(train_labels)
        if Y_train.shape[1] != num_labels:
            raise MetricsInputError(
                f"{train_labels} has {Y_train.shape[1]} labels but {labels} has {num_labels}; "
                "--train-labels must use the same label set"
            )
        logger.info(
            "propensities from the training labels %s (A=%g, B=%g)", train_labels, prop_a, prop_b
        )
        Y, Y_train, ids = _compact_labels(Y, Y_train, ids)
        inv_prop = inverse_propensity(Y_train, prop_a, prop_b)
    else:
        logger.warning(
            "PSP@k/PSnDCG@k use propensities computed from the evaluated labels %s (A=%g, B=%g);"
            " pass --train-labels for the usual training-set propensities",
            labels,
            prop_a,
            prop_b,
        )
        Y, _, ids = _compact_labels(Y, None, ids)
        inv_prop = inverse_propensity(Y, prop_a, prop_b)
    return evaluate(Y, ids, ks=range(1, k + 1), inv_prop=inv_prop)


def _evaluate_model(
    model: Path,
    data: Path,
    k: int,
    device: str,
    chunk_size: int | None,
    ignore_extra: bool,
    show_progress: bool,
    fields: Any = None,
    labels: Path | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    from xmc_toolkit.evaluate import evaluate_model_dir  # lazy: imports torch

    kwargs: dict[str, Any] = {
        "ks": tuple(range(1, k + 1)),
        "device": device,
        "ignore_extra": ignore_extra,
        "show_progress": show_progress,
        "verify": verify,
        "zero_based": zero_based(),
    }
    if fields:  # only the field names given on the command line (else: the model's)
        kwargs["fields"] = fields
    if labels is not None:
        kwargs["labels_path"] = labels
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    return dict(evaluate_model_dir(model, data, **kwargs))


@click.command("eval")
@click.option("--predictions", type=_FILE, help="Prediction file (text or .jsonl) to evaluate.")
@click.option("--labels", type=_DATA,
              help="Label file of the predicted points (any format); with --model and an .npz "
                   "feature matrix --data X.npz, its label matrix Y.npz.")
@click.option(
    "--train-labels",
    type=_DATA,
    help="Training labels for the propensities of PSP/PSnDCG (default: the evaluated labels).",
)
@click.option(
    "-A", "--propensity-a", "prop_a", type=float, default=None,
    help="Propensity parameter A (default 0.55; Wikipedia 0.5, Amazon 0.6).",
)
@click.option(
    "-B", "--propensity-b", "prop_b", type=float, default=None,
    help="Propensity parameter B (default 1.5; Wikipedia 0.4, Amazon 2.6).",
)
@click.option(
    "--sort-by-score", is_flag=True,
    help="Sort each prediction line by decreasing score instead of rejecting unsorted lines.",
)
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Trained model directory to evaluate (instead of --predictions).")
@click.option("--data", type=_DATA,
              help="Test data set for --model: raw text (.jsonl/.tsv/.csv) for a model trained on "
                   "text, else the model's feature format.")
@model_text_field_options
@click.option("--device", default=None, help="auto | cpu | cuda (with --model; default auto).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Labels scored at once (with --model; lower it when out of memory).")
@click.option("--ignore-extra", is_flag=True,
              help="Ignore test labels/features unknown to the model (with --model).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="CPU threads for torch with --model (0: one per core or OMP_NUM_THREADS).")
@click.option("--k", "k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Report metrics at 1..k.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (fractions).")
@no_verify_option
@zero_based_option
def eval_(
    predictions: Path | None,
    labels: Path | None,
    train_labels: Path | None,
    prop_a: float | None,
    prop_b: float | None,
    sort_by_score: bool,
    model: Path | None,
    data: Path | None,
    device: str | None,
    chunk_size: int | None,
    ignore_extra: bool,
    text_field: str | None,
    label_field: str | None,
    label_sep: str | None,
    threads: int,
    k: int,
    as_json: bool,
    no_verify: bool,
) -> None:
    """Evaluate predictions: P@k, nDCG@k, PSP@k, PSnDCG@k, R@k for k = 1..K.

    \b
    xmc eval --predictions pred.txt --labels test.txt --train-labels train.txt
    xmc eval --model runs/bibtex --data test.txt --json
    xmc eval --model runs/kjv --data kjv-strongs_test.jsonl
    """
    if (predictions is None) == (model is None):
        raise click.UsageError("give exactly one of --predictions (with --labels) or --model "
                               "(with --data)")
    if predictions is not None:
        misplaced = [flag for flag, value in (("--data", data), ("--device", device),
                                              ("--chunk-size", chunk_size),
                                              ("--ignore-extra", ignore_extra or None))
                     if value is not None]
        if misplaced:
            raise click.UsageError(f"{', '.join(misplaced)} apply only with --model")
        if labels is None:
            raise click.UsageError("--predictions needs --labels (the true labels of the points)")
        metrics = _evaluate_predictions(
            predictions, labels, train_labels,
            0.55 if prop_a is None else prop_a, 1.5 if prop_b is None else prop_b,
            k, sort_by_score,
        )
    else:
        misplaced = [flag for flag, value in (("--train-labels", train_labels),
                                              ("-A", prop_a), ("-B", prop_b),
                                              ("--sort-by-score", sort_by_score or None))
                     if value is not None]
        if misplaced:
            raise click.UsageError(f"{', '.join(misplaced)} apply only with --predictions")
        if data is None:
            raise click.UsageError("--model needs --data (the test data set)")
        from xmc_toolkit.device import set_threads

        set_threads(threads)
        metrics = _evaluate_model(
            model, data, k, device or "auto", chunk_size, ignore_extra,
            show_progress=not as_json and sys.stderr.isatty(), verify=not no_verify,
            fields=given_fields(text_field, label_field, label_sep), labels=labels,
        )
    ks = range(1, k + 1)
    if as_json:
        click.echo(metrics_json(metrics))
    elif sys.stdout.isatty():
        from rich.console import Console

        Console().print(metrics_table(metrics, ks))
    else:
        click.echo(metrics_lines(metrics, ks))


COMMANDS = [eval_]
