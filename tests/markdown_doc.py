"""Reading the reports back: markdown tables (checked well-formed as they are parsed), image links,
and sizes as the reports print them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_SEPARATOR = re.compile(r"^:?-+:?$")
_SIZE = re.compile(r"^(-?[0-9,]+(?:\.([0-9]+))?) (B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


@dataclass
class Table:
    section: str  # the nearest `##` heading above the table
    subsection: str  # the nearest `###` heading under that section, or ""
    header: list[str]
    rows: list[dict[str, str]]

    def column(self, name: str) -> list[str]:
        return [row[name] for row in self.rows]


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), f"table line not closed by pipes: {line!r}"
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(line[1:-1])]


def tables(text: str) -> list[Table]:
    """Every table, asserting each is well formed: a header, a separator of dashes, and rows with
    as many cells as the header."""
    found, section, subsection, block = [], "", "", []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            header = _cells(block[0])
            assert len(block) >= 2, f"table with no separator under {section!r}"
            separator = _cells(block[1])
            assert len(separator) == len(header) and all(_SEPARATOR.match(c) for c in separator), block[1]
            rows = []
            for row_line in block[2:]:
                cells = _cells(row_line)
                assert len(cells) == len(header), f"{len(cells)} cells, {len(header)} headers: {row_line}"
                rows.append(dict(zip(header, cells, strict=True)))
            assert len(set(header)) == len(header), f"repeated header in {header}"
            found.append(Table(section, subsection, header, rows))
            block = []
        if line.startswith("## "):
            section, subsection = line[3:].strip(), ""
        elif line.startswith("### "):
            subsection = line[4:].strip()
    return found


def table_under(text: str, section: str, subsection: str = "") -> Table:
    matches = [t for t in tables(text) if t.section == section and t.subsection == subsection]
    assert len(matches) == 1, f"{len(matches)} tables under {section!r} / {subsection!r}"
    return matches[0]


def image_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def assert_images_are_png(markdown_path: Path) -> list[Path]:
    """Every image linked from the markdown exists beside it and starts with the PNG signature."""
    paths = [markdown_path.parent / link for link in image_links(markdown_path.read_text())]
    for path in paths:
        assert path.is_file(), f"linked image {path} is missing"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return paths


def assert_size_matches(cell: str, exact_bytes: int) -> None:
    """A printed size ("248.9 MB", "1.99 GB", "0 B") agrees with the exact bytes to within half its
    last printed digit."""
    match = _SIZE.match(cell)
    assert match, f"not a size: {cell!r}"
    number, decimals, unit = match.groups()
    value = float(number.replace(",", "")) * _UNITS[unit]
    tolerance = 0.5 * 10 ** -len(decimals or "") * _UNITS[unit]
    assert abs(value - exact_bytes) <= tolerance, f"{cell!r} is not {exact_bytes:,} bytes"


def assert_percent_matches(cell: str, exact: float, digits: int) -> None:
    """A printed percentage ("+3.2%", "0.237%") agrees with `exact` (a percentage) to within half
    its last printed digit; `digits` is how many decimals were printed for fixed formats."""
    assert cell.endswith("%"), cell
    value = float(cell[:-1])
    assert abs(value - exact) <= 0.5 * 10 ** -digits + 1e-12, f"{cell!r} is not {exact}%"
