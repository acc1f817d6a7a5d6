"""Regenerate the TrainConfig and FeaturizerConfig flag tables of docs/cli.md from the help texts.

    python scripts/gen_cli_table.py          # rewrites the table in place
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from xmc_toolkit.featurizer import FeaturizerConfig
from xmc_toolkit.train import TrainConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
MARK = "Every TrainConfig field is a flag (defaults shown):"
FEATURIZER_MARK = "Every FeaturizerConfig field is a flag of `xmc train` on text data (defaults shown):"


def table(cls: type = TrainConfig) -> str:
    hints = typing.get_type_hints(cls)
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        name = f.name.replace("_", "-")
        flag = f"`--{name} / --no-{name}`" if hints[f.name] is bool else f"`--{name}`"
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = re.sub(r"\s*\(--[a-z0-9-]+(/--[a-z0-9-]+)?\)\s*$", "", f.metadata.get("help", ""))
        rows.append(f"| {flag} | `{shown}` | {text.replace('|', '&#124;')} |")
    return "\n".join(rows)


def _replace(doc: str, mark: str, body: str) -> str:
    start = doc.index(mark) + len(mark)
    body_start = doc.index("| flag |", start)
    end = doc.find("\n\n", body_start)
    end = len(doc) if end < 0 else end
    return doc[:body_start] + body + doc[end:]


def main() -> None:
    doc = _replace(DOC.read_text(), MARK, table(TrainConfig))
    DOC.write_text(_replace(doc, FEATURIZER_MARK, table(FeaturizerConfig)))


if __name__ == "__main__":
    main()
