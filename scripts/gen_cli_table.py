"""Regenerate the TrainConfig flag table of docs/cli.md from the fields' help texts.

    python scripts/gen_cli_table.py          # rewrites the table in place
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from xmc_toolkit.train import TrainConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
MARK = "Every TrainConfig field is a flag (defaults shown):"


def table() -> str:
    hints = typing.get_type_hints(TrainConfig)
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        name = f.name.replace("_", "-")
        flag = f"`--{name} / --no-{name}`" if hints[f.name] is bool else f"`--{name}`"
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = re.sub(r"\s*\(--[a-z0-9-]+(/--[a-z0-9-]+)?\)\s*$", "", f.metadata.get("help", ""))
        rows.append(f"| {flag} | `{shown}` | {text.replace('|', '&#124;')} |")
    return "\n".join(rows)


def main() -> None:
    doc = DOC.read_text()
    start = doc.index(MARK) + len(MARK)
    body_start = doc.index("| flag |", start)
    end = doc.find("\n\n", body_start)
    end = len(doc) if end < 0 else end
    DOC.write_text(doc[:body_start] + table() + doc[end:])


if __name__ == "__main__":
    main()
