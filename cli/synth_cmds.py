"""``xmc data synth`` and ``xmc data download``: a thin shell over the synthetic generator and the
data set registry."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from xmc_toolkit.data.registry import download as download_dataset
from xmc_toolkit.data.registry import get_card, list_cards
from xmc_toolkit.data.synthetic import write_synthetic

__all__ = ["DATA_COMMANDS", "synth", "download"]

logger = logging.getLogger(__name__)


@click.command()
@click.option("--labels", "num_labels", type=int, required=True, help="Number of labels L.")
@click.option("--points", "num_points", type=int, required=True, help="Training points N.")
@click.option("--features", "num_features", type=int, required=True, help="Features D.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (model and points).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Training file to write (XC text format).")
@click.option("--test-out", "test_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Test file from the same latent model.")
@click.option("--test-points", "test_points", type=int, default=0, show_default=True,
              help="Points in the test file.")
@click.option("--clusters", type=int, default=None,
              help="Latent label clusters (default round(sqrt(L))).")
@click.option("--avg-labels", type=float, default=5.0, show_default=True,
              help="Mean labels per point.")
@click.option("--label-zipf", type=float, default=1.1, show_default=True,
              help="Zipf exponent of label popularity.")
@click.option("--chunk-size", type=int, default=65536, show_default=True,
              help="Points generated per step (memory grows with it).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def synth(
    num_labels: int,
    num_points: int,
    num_features: int,
    seed: int,
    out: Path,
    test_out: Path | None,
    test_points: int,
    clusters: int | None,
    avg_labels: float,
    label_zipf: float,
    chunk_size: int,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Generate a synthetic XMC data set (Zipf labels in latent clusters, tf-idf features).

    Train and test files drawn with the same --seed share the latent model, so a model trained
    on one generalises to the other. The output is identical for any --chunk-size.
    """
    if test_points > 0 and test_out is None:
        raise click.UsageError("--test-points needs --test-out")
    if test_out is not None and test_points == 0:
        raise click.UsageError("--test-out needs --test-points > 0")
    summary = write_synthetic(
        out,
        num_labels,
        num_points,
        num_features,
        seed,
        test_path=test_out,
        num_test_points=test_points,
        chunk_size=chunk_size,
        show_progress=not no_progress and not as_json,
        num_clusters=clusters,
        avg_labels=avg_labels,
        label_zipf=label_zipf,
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for split, s in summary.items():
        n = max(1, s["num_points"])
        click.echo(
            f"{split}: {s['path']}  N={s['num_points']:,} D={num_features:,} L={num_labels:,}  "
            f"{s['feature_nnz'] / n:.1f} features/point, {s['label_nnz'] / n:.2f} labels/point  "
            f"({s['seconds']:.1f} s)"
        )


def _cards_table() -> Table:
    table = Table(title="standard data sets", header_style="bold")
    for col in ("name", "N train", "N test", "D", "L", "labels/pt", "A / B"):
        table.add_column(col, justify="left" if col == "name" else "right", no_wrap=True)
    for c in list_cards():
        s, p = c["stats"], c["propensity"]
        table.add_row(
            c["name"], f"{s['num_train']:,}", f"{s['num_test']:,}", f"{s['num_features']:,}",
            f"{s['num_labels']:,}", f"{s['avg_labels_per_point']:.2f}", f"{p['A']} / {p['B']}",
        )
    return table


@click.command()
@click.argument("name", required=False)
@click.option("--dir", "dest_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("data"), show_default=True, help="Parent folder of the data set.")
@click.option("--url", default=None,
              help="Download from this URL instead of the card's (http(s):// or file://).")
@click.option("--no-validate", is_flag=True, help="Skip the N/D/L check against the card.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--list", "list_only", is_flag=True, help="List the standard data sets and exit.")
def download(
    name: str | None,
    dest_dir: Path,
    url: str | None,
    no_validate: bool,
    no_progress: bool,
    list_only: bool,
) -> None:
    """Download NAME (e.g. Bibtex, EURLex-4K), extract it and check it against its card.

    An interrupted download resumes where it stopped when run again.
    """
    if list_only or name is None:
        console = Console()
        console.width = max(console.width, 100)
        console.print(_cards_table())
        if name is None and not list_only:
            raise click.UsageError("give a data set NAME (listed above)")
        return
    card = get_card(name)
    folder = download_dataset(
        card["name"], dest_dir, url=url, show_progress=not no_progress, validate=not no_validate
    )
    click.echo(f"{card['name']}: ready in {folder}")


DATA_COMMANDS = [synth, download]
