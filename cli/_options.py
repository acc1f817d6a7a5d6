"""Options shared by several commands.

``--zero-based/--one-based`` (:func:`zero_based_option`) forces the id base of svmlight inputs
for every data file a command reads; without it the loader's rule applies (the base stated
by an xmc-toolkit header line, else 0-based when some feature id is 0, else 1-based, with a
warning saying so). :func:`load_data` reads a data set with that choice.
"""

from __future__ import annotations

import os
from typing import Any

import click

__all__ = ["zero_based_option", "zero_based", "load_data", "no_verify_option",
           "text_field_options", "model_text_field_options", "given_fields"]

_KEY = "xmc.zero_based"


def _store(ctx: click.Context, param: click.Parameter, value: bool | None) -> None:
    if value is not None:
        ctx.meta[_KEY] = value


def zero_based_option(func: Any) -> Any:
    """Add ``--zero-based/--one-based`` (svmlight inputs only; default: auto)."""
    return click.option(
        "--zero-based/--one-based", "zero_based", default=None, expose_value=False,
        callback=_store, is_eager=True,
        help="svmlight inputs: feature ids are 0-based / 1-based (default: the file's "
             "xmc-toolkit header, else 0-based when feature 0 occurs, else 1-based).")(func)


def zero_based() -> bool | str:
    """The choice of ``--zero-based/--one-based`` for the running command (``"auto"``)."""
    ctx = click.get_current_context(silent=True)
    return "auto" if ctx is None else ctx.meta.get(_KEY, "auto")


def load_data(path: str | os.PathLike[str], fmt: str | None = None, **kwargs: Any) -> Any:
    """:func:`xmc_toolkit.data.load` with the command's ``--zero-based/--one-based``."""
    from xmc_toolkit.data import load

    return load(path, fmt, zero_based=zero_based(), **kwargs)


def no_verify_option(func: Any) -> Any:
    """Add ``--no-verify``: skip the sha256 check of the model directory's files."""
    return click.option(
        "--no-verify", "no_verify", is_flag=True,
        help="Skip checking the model files against checksums.json (faster for big models; "
             "a corrupt file then goes unnoticed).")(func)


_TEXT_FIELDS = (  # flag, help, default of the training file
    ("--label-sep", "TSV/CSV data: separator of the labels inside their column", "|"),
    ("--label-field", "Text data: JSON field (a list of strings) or column of the labels",
     "labels"),
    ("--text-field", "Text data (.jsonl/.tsv/.csv): JSON field or column of the text", "text"),
)


def text_field_options(func: Any) -> Any:
    """``--text-field``, ``--label-field``, ``--label-sep`` of a training file (defaults
    ``text``, ``labels``, ``|``)."""
    for name, what, default in _TEXT_FIELDS:
        func = click.option(name, name[2:].replace("-", "_"), default=default,
                            show_default=True, help=f"{what}.")(func)
    return func


def model_text_field_options(func: Any) -> Any:
    """The same options for commands that read text *for a trained model* (eval, predict):
    unset, each is the name the model's training file used."""
    for name, what, default in _TEXT_FIELDS:
        func = click.option(name, name[2:].replace("-", "_"), default=None,
                            help=f"{what} (default: as in the model's training file, else "
                                 f"{default!r}).")(func)
    return func


def given_fields(text_field: str | None, label_field: str | None,
                 label_sep: str | None) -> dict[str, str]:
    """The field names given on the command line (the others come from the model)."""
    given = {"text_field": text_field, "label_field": label_field, "label_sep": label_sep}
    return {k: v for k, v in given.items() if v is not None}
