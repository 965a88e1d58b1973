"""One measured row of the table, its ratios to wavg, and the CSV form of a run.

Ratios are filled in per cell once every tool of the cell has run, so each ratio compares
figures measured in the same run, on the same files, with the same cache state.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

OK = "ok"
TOOL_LABELS = {
    "wavg": "wavg combine",
    "tutorial": "tutorial way",
    "inmemory": "in-memory h5py",
    "dd-read": "dd read floor",
    "dd-write": "dd write floor",
    "dd-write-fsync": "dd write+fsync",
    "startup": "wavg --version",
}


@dataclass(frozen=True)
class Row:
    """A tool's figures on one cell; `status` is "ok" or why there is no figure."""

    cell: str
    groups: str
    fmt: str
    n: int
    file_mb: float
    total_mb: float
    tool: str
    status: str
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    time_x_wavg: float | None = None
    rss_x_wavg: float | None = None
    wavg_x_read_floor: float | None = None
    wavg_x_io_floor: float | None = None  # over dd read + dd write with fsync
    check: str = ""
    note: str = ""


def with_ratios(rows: list[Row]) -> list[Row]:
    """Fill time and RSS ratios to wavg, and wavg's ratios to the dd floors, in one cell."""
    by_tool = {row.tool: row for row in rows if row.status == OK}
    wavg = by_tool.get("wavg")
    return [_wavg_floors(row, by_tool) if row is wavg else _vs_wavg(row, wavg) for row in rows]


def _wavg_floors(wavg: Row, by_tool: dict[str, Row]) -> Row:
    """wavg over the read floor, and over read + write-with-fsync (what wavg must do at least)."""
    read, write = by_tool.get("dd-read"), by_tool.get("dd-write-fsync")
    if read is None or not read.wall_s:
        return wavg
    io = read.wall_s + write.wall_s if write is not None else None
    return replace(
        wavg,
        wavg_x_read_floor=wavg.wall_s / read.wall_s,
        wavg_x_io_floor=wavg.wall_s / io if io else None,
    )


def _vs_wavg(row: Row, wavg: Row | None) -> Row:
    if row.status != OK or wavg is None or row.tool == "startup":
        return row
    rss = None if row.tool.startswith("dd") else row.peak_rss_mb / wavg.peak_rss_mb
    return replace(row, time_x_wavg=row.wall_s / wavg.wall_s, rss_x_wavg=rss)


def write_csv(rows: list[Row], path: Path) -> None:
    """All rows with every field; numbers unrounded so later analysis loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def read_csv(path: Path) -> list[Row]:
    """Rows back from a results.csv (to redraw the plot or the report without rerunning)."""
    types = {f.name: f.type for f in fields(Row)}
    rows = []
    with path.open(newline="") as handle:
        for record in csv.DictReader(handle):
            values: dict = {}
            for key, text in record.items():
                kind = types[key]
                if "float" in kind:
                    values[key] = float(text) if text else None
                elif kind == "int":
                    values[key] = int(text)
                else:
                    values[key] = text
            rows.append(Row(**values))
    return rows
