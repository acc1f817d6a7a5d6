"""Entry point of the ``xmc`` command.

The command modules (``cli/data_cmds.py``, ``cli/synth_cmds.py``, ``cli/eval_cmds.py``,
``cli/train_cmds.py``) each expose ``COMMANDS`` (top-level commands) and/or ``DATA_COMMANDS``
(commands under ``xmc data``); this module only assembles them and turns library errors into a
one-line message with exit status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from xmc_toolkit import __version__
from xmc_toolkit.errors import XMCError

__all__ = ["xmc", "main"]

_COMMAND_MODULES = ("cli.data_cmds", "cli.synth_cmds", "cli.eval_cmds", "cli.train_cmds",
                    "cli.info_cmds", "cli.label_cmds")


class XMCGroup(click.Group):
    """A click group that reports errors as one line: exit status 2 for :class:`XMCError`,
    out of memory and file-system errors (``OSError``: disk full, permissions, a missing
    folder, ...), 130 for Ctrl-C outside training (training handles its own, see
    ``xmc train``)."""

    def invoke(self, ctx: click.Context) -> object:
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return super().invoke(ctx)
        except XMCError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except MemoryError:
            if debug:
                raise
            click.echo("error: out of memory; lower --batch-size or --chunk-size", err=True)
            ctx.exit(2)
        except OSError as exc:
            if debug:
                raise
            from xmc_toolkit._fileio import output_error

            where = exc.filename if exc.filename is not None else "a file"
            click.echo(f"error: {output_error(where, exc, 'access')}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted (Ctrl-C); nothing more was written", err=True)
            ctx.exit(130)
        return None  # pragma: no cover


@click.group(cls=XMCGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xmc")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug).")
def xmc(debug: bool, verbose: int) -> None:
    """xmc-toolkit: extreme multi-label classification with sampled softmax and MIDX."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if debug:
        level = min(level, logging.INFO)
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        # logs go to stderr so that `--json` output on stdout stays machine-readable
        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_path=False, rich_tracebacks=debug
        )
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


@xmc.group(cls=XMCGroup)
def data() -> None:
    """Inspect, convert, generate and download data sets."""


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        for command in getattr(module, "COMMANDS", ()):
            xmc.add_command(command)
        for command in getattr(module, "DATA_COMMANDS", ()):
            data.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    xmc.main(args=argv if argv is not None else sys.argv[1:], prog_name="xmc")


def train_module_main(argv: list[str] | None = None) -> None:
    """``python -m xmc_toolkit.train [FLAGS]``: ``xmc train [FLAGS]`` (the only flag parser).

    Under ``torchrun --nproc-per-node N -m xmc_toolkit.train [FLAGS]`` (``WORLD_SIZE > 1``)
    ``xmc train`` trains with the label table sharded across the processes. The library
    reaches this function only from the ``__main__`` guard of ``xmc_toolkit.train`` (and of
    ``xmc_toolkit.distributed``, the older launch name): importing the library never imports
    ``cli``.
    """
    args = list(argv) if argv is not None else sys.argv[1:]
    xmc.main(args=["train", *args], prog_name="xmc")


if __name__ == "__main__":  # pragma: no cover
    main()
