"""Small markdown pieces shared by the reports: tables, image links, unit wording."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# How a report says what made it (capacity and validation: a "- made by:" bullet; adapters: a
# sentence): a page holding either was written by a report, not by hand.
MADE_BY = re.compile(r"^(- made by: `|Made by `)", re.M)


@dataclass(frozen=True)
class Written:
    """What a report wrote: the markdown, its images, and problems worth a warning."""

    markdown: Path
    images: tuple[Path, ...]
    warnings: tuple[str, ...]
    records: int | None = None  # usable input records, for reports made from records

def table(frame, text_columns: int = 1) -> str:
    """A pandas DataFrame of preformatted cells as a GitHub markdown table (tabulate underneath).

    `disable_numparse` keeps every cell exactly as formatted: tabulate would otherwise re-print
    "12.50" as "12.5" and lose the report's chosen precision.
    """
    if frame.empty:
        return "_(no rows)_"
    # A pipe inside a header or a cell would split it into two columns.
    frame = frame.rename(columns=_escape).map(_escape)
    # Names on the left, numbers on the right.
    text_columns = min(text_columns, len(frame.columns))
    align = ("left",) * text_columns + ("right",) * (len(frame.columns) - text_columns)
    return frame.to_markdown(index=False, tablefmt="github", disable_numparse=True, colalign=align)


def _escape(text) -> str:
    return str(text).replace("|", "\\|")


def image(alt: str, path: Path, markdown_path: Path) -> str:
    """An image link relative to the markdown file, so the folder can be moved as a whole."""
    rel = Path(path).resolve().relative_to(Path(markdown_path).resolve().parent)
    return f"![{alt}]({rel.as_posix()})"


def unit_phrase(unit: str) -> str:
    return ("decimal units (1 GB = 10^9 bytes)" if unit == "GB"
            else "binary units (1 GiB = 2^30 bytes)")


def code(text: str) -> str:
    return f"`{text}`"


def hand_written(root: Path) -> list[Path]:
    """`root`/README.md and the pages under `root`/docs/ that no report wrote (none says `MADE_BY`):
    the pages whose shown outputs are checked and rewritten from the commands they show."""
    docs = sorted(p for p in (root / "docs").glob("*.md") if not MADE_BY.search(p.read_text()))
    return [root / "README.md", *docs]
