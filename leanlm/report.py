"""Results for people (a rich table) and for scripts (`--json`: one JSON object as the last line)."""
from __future__ import annotations

import json
import sys


def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"
        return f"{v:.3e}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def print_table(title: str, data, columns: list[str] | None = None) -> None:
    """data: a dict (two columns: metric, value) or a list of dicts (one row each)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    if isinstance(data, dict):
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in data.items():
            if not isinstance(v, (dict, list)):
                table.add_row(k, fmt(v))
    else:
        columns = columns or list(dict.fromkeys(k for row in data for k in row))
        for c in columns:
            table.add_column(c, justify="left" if c == columns[0] else "right")
        for row in data:
            table.add_row(*[fmt(row.get(c, "")) for c in columns])
    Console(stderr=False).print(table)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def show(title: str, data, as_json: bool) -> None:
    """The table for people, then (with --json) the same data as the last line for scripts."""
    print_table(title, data)
    if as_json:
        emit_json(data)


def progress(**kw):
    """A rich progress bar that writes to stderr (stdout stays clean for --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, **kw)
