"""``xmc labels add``: grow a trained model's label set without a training step.

    xmc labels add --model runs/bibtex --data grown.txt --label-names names.txt --out runs/b2

The new labels are the labels of ``--data`` the model does not know (by name when both carry
names, else ids ``>= L``); their rows come from the model's encodings of their rows
(:mod:`xmc_toolkit.grow`). ``--model`` is only read.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli._options import load_data, zero_based_option

__all__ = ["COMMANDS", "labels", "add"]

_DATA = click.Path(exists=True, dir_okay=False, path_type=Path)
_MODEL = click.Path(path_type=Path)


@click.group("labels")  # errors reach the root group: one line, exit 2
def labels() -> None:
    """Manage a trained model's label set (add new labels)."""


@labels.command("add")
@click.option("--model", "model", type=_MODEL, required=True, help="Trained model directory.")
@click.option("--data", "data", type=_DATA, required=True,
              help="Rows with the new labels (any format; may carry old labels too, which "
                   "calibrate the new rows).")
@click.option("--out", "out", type=_MODEL, required=True,
              help="Model directory to write (the grown model; --model is never modified).")
@click.option("--label-names", "label_names", type=_DATA, default=None,
              help="Label names of --data (Mulan XML or one name a line, in id order).")
@click.option("--ignore-extra", is_flag=True,
              help="Cut (or pad) --data's feature columns to the model's instead of failing.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@zero_based_option
def add(model: Path, data: Path, out: Path, label_names: Path | None, ignore_extra: bool,
        device: str, as_json: bool) -> None:
    """Add the labels of --data that the model does not know; no training step.

    \b
    xmc labels add --model runs/bibtex --data new_rows.txt --out runs/bibtex+new
    xmc labels add --model runs/kjv --data train.txt --label-names labels.txt --out runs/kjv2
    """
    from xmc_toolkit import grow

    grow.check_out_dir(model, out)
    ds = load_data(data, label_names_from=label_names)  # with --zero-based/--one-based
    g = grow.add_labels_dir(model, ds, out, ignore_extra=ignore_extra, path=str(data),
                            device=device)
    m = g.match
    summary = {"out": str(out), "parent": str(model), "parent_num_labels": m.num_old,
               "labels_added": m.num_new, "num_labels": m.num_labels, "matched_by": m.by,
               "rows": g.data.num_points, "init": g.rows.stats}
    if as_json:
        click.echo(json.dumps(summary))
        return
    shown = m.new_names[:5] if m.new_names is not None else list(range(m.num_old,
                                                                       m.num_labels))[:5]
    more = f" and {m.num_new - 5} more" if m.num_new > 5 else ""
    click.echo(f"added {m.num_new} labels (matched by {m.by}; {', '.join(map(str, shown))}"
               f"{more}) to the {m.num_old} of {model} from {g.data.num_points} rows")
    click.echo(f"model written to {out}")


COMMANDS = [labels]
