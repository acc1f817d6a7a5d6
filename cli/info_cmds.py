"""``xmc info MODEL``: what a model directory holds (sizes, architecture, labels, metrics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

__all__ = ["COMMANDS", "info"]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _lines(d: dict[str, Any]) -> list[str]:
    a, t, mem, disk = d["architecture"], d["training"], d["memory"], d["disk"]
    out = [f"model        {d['path']}",
           f"disk         {_size(disk['model_bytes'])} model files"
           + (f" + {_size(disk['checkpoint_bytes'])} checkpoint/" if disk["checkpoint_bytes"]
              else ""),
           f"memory       {mem['parameters']:,} parameters ({_size(mem['parameter_bytes'])})"
           + (f" + featurizer {_size(mem['featurizer_bytes'])}" if mem["featurizer_bytes"]
              else ""),
           f"architecture D={a['num_features']:,} -> hidden {a['hidden'] or 'none (linear)'} -> "
           f"d={a['dim']}, {a['members']} member(s), loss {a['loss']}"
           + (f" ({a['sampler']})" if a["sampler"] else "")
           + f", bag {a['bag_optimizer']}, dropout {a['dropout']}",
           f"labels       {a['num_labels']:,}" + (" named, e.g. " + ", ".join(
               d["labels"]["first_names"]) if d["labels"]["named"] else " (ids only)"),
           f"training     {t['num_points']:,} points, {t['avg_labels_per_point']:.2f} labels a "
           f"point, {t['labels_without_points']:,} labels without points; {t['epochs']} epochs"
           + (f", {t['steps']} steps, {t['seconds']:.0f} s" if t["seconds"] is not None else "")]
    f = d["featurizer"]
    if f is not None:
        out.append(f"featurizer   {f['kind']} of {f['num_features']:,} {f['analyzer']} "
                   f"{f['ngram_range'][0]}-{f['ngram_range'][1]}-grams, min_df {f['min_df']}, "
                   f"sublinear_tf {f['sublinear_tf']}")
    m = d["metrics"]
    if m["final_train_loss"] is not None:
        out.append(f"final loss   {m['final_train_loss']:.4f}")
    if m["validation"]:
        shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in m["validation"].items()
                          if isinstance(v, (int, float)) and k.startswith(("P@", "nDCG@")))
        out.append(f"validation   epoch {m['best_epoch']}: {shown}")
    return out


@click.command("info")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model: Path, as_json: bool) -> None:
    """Sizes on disk and in memory, the resolved architecture, labels, training statistics and
    final metrics of a model directory.

    \b
    xmc info runs/kjv
    xmc info runs/kjv --json
    """
    from xmc_toolkit.model_info import model_info

    d = model_info(model)
    if as_json:
        click.echo(json.dumps(d))
        return
    click.echo("\n".join(_lines(d)))


COMMANDS = [info]
