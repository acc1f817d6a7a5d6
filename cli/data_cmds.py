"""``xmc data info`` and ``xmc data convert``: a thin shell over :mod:`xmc_toolkit.data.formats`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cli._options import load_data, text_field_options, zero_based_option
from xmc_toolkit.data.formats import FORMATS, dataset_stats, save

__all__ = ["DATA_COMMANDS", "info", "convert", "render_stats"]

_WRITABLE = ("xc", "xc-split", "svmlight", "npz")
_QUANTILE_LABELS = {
    "min": "min",
    "q25": "25%",
    "median": "50%",
    "q75": "75%",
    "q90": "90%",
    "q99": "99%",
    "max": "max",
}


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if v != int(v) else f"{int(v):,}"
    return f"{v:,}"


def render_stats(stats: dict[str, Any], title: str) -> Table:
    """A rich table of :func:`~xmc_toolkit.data.formats.dataset_stats` output."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    rows = [
        ("points (N)", stats["num_points"]),
        ("features (D)", stats["num_features"]),
        ("labels (L)", stats["num_labels"]),
        ("feature non-zeros", stats["feature_nnz"]),
        ("label non-zeros", stats["label_nnz"]),
        ("avg features / point", stats["avg_features_per_point"]),
        ("avg labels / point", stats["avg_labels_per_point"]),
        ("avg points / label", stats["avg_points_per_label"]),
    ]
    for name, value in rows:
        table.add_row(name, _num(value))
    q = stats["label_frequency_quantiles"]
    for k, lbl in _QUANTILE_LABELS.items():
        table.add_row(f"points / label, {lbl}", _num(q[k]))
    table.add_row("empty rows (no labels)", _num(stats["empty_rows"]))
    table.add_row("empty labels (no rows)", _num(stats["empty_labels"]))
    table.add_row("rows without features", _num(stats["rows_without_features"]))
    return table


@click.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--fmt", type=click.Choice(FORMATS), default=None, help="Input format (default: inferred).")
@click.option("--label-xml", type=click.Path(path_type=Path), default=None,
              help="ARFF: the Mulan label XML (default: the .xml beside the file).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@zero_based_option
@text_field_options
def info(path: Path, fmt: str | None, label_xml: Path | None, as_json: bool,
         text_field: str, label_field: str, label_sep: str) -> None:
    """Print size and label statistics of the data set at PATH.

    A raw-text file (.jsonl/.tsv/.csv) is featurized with the default featurizer settings (what
    a plain `xmc train` fits), so its features (D) are that vocabulary.
    """
    from xmc_toolkit.featurizer import FeaturizerConfig
    from xmc_toolkit.inputs import TextFields, is_text_file, load_training_data

    if fmt is None and is_text_file(path):
        ds, _ = load_training_data(path, FeaturizerConfig(),
                                   fields=TextFields(text_field, label_field, label_sep))
    else:
        ds = load_data(path, fmt, label_xml=label_xml)
    stats = dataset_stats(ds)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
    else:
        Console().print(render_stats(stats, title=str(path)))


@click.command("convert")
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--from", "from_fmt", type=click.Choice(FORMATS), default=None,
              help="Input format (default: inferred).")
@click.option("--to", "to_fmt", type=click.Choice(_WRITABLE), default=None,
              help="Output format (default: from OUT's name, else xc).")
@click.option("--label-xml", type=click.Path(path_type=Path), default=None,
              help="ARFF input: the Mulan label XML (default: the .xml beside the file); "
                   "other inputs: label names to attach (an XML or one name per line; the "
                   "count must equal L).")
@zero_based_option
def convert(src: Path, dst: Path, from_fmt: str | None, to_fmt: str | None, label_xml: Path | None) -> None:
    """Convert the data set IN to OUT (xc, xc-split, svmlight or npz).

    svmlight output starts with the header line '# xmc-toolkit svmlight zero_based=1
    num_features=D num_labels=L' (a comment to other readers), so it reads back exactly.
    """
    from xmc_toolkit.data.formats import infer_format

    if label_xml is not None and (from_fmt or infer_format(src)) != "arff":
        ds = load_data(src, from_fmt, label_names_from=label_xml)  # count checked
    else:
        ds = load_data(src, from_fmt, label_xml=label_xml)
    save(ds, dst, to_fmt)
    click.echo(f"wrote {dst}: {ds.num_points} points, {ds.num_features} features, {ds.num_labels} labels")


DATA_COMMANDS = [info, convert]
