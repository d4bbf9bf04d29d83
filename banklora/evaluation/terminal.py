"""How compare's tables are laid out in a terminal: in full where there is room, compact in 80
columns (a CI log, a default terminal), where every number and word must stay whole; the
per-question detail that does not fit is in the Markdown and HTML reports."""

from __future__ import annotations

from rich import box
from rich.table import Table

WIDE = 120  # columns from which the full tables fit
SHORT_NAME = 12  # longer model names become A, B, ... in compact tables' headers, with a legend


def is_narrow(console) -> bool:
    return console.width < WIDE


def table(title: str, narrow: bool) -> Table:
    """A table with compare's look: ruled in full, light and edge-less when narrow."""
    if narrow:
        return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    return Table(title=title)


def number_column(t: Table, header: str) -> None:
    """A right-aligned column whose cells never wrap or get cut (numbers, intervals)."""
    t.add_column(header, justify="right", no_wrap=True)


def significance(significant: bool, narrow: bool) -> str:
    return ("yes" if significant else "no") if narrow else ("significant" if significant else "not significant")


def labels(models: list[str], narrow: bool) -> dict[str, str]:
    """What compact tables call each model: its name, or a letter where any name is long."""
    if not narrow or all(len(m) <= SHORT_NAME for m in models):
        return {m: m for m in models}
    letters = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return {m: m if m == "base" else next(letters) for m in models}


def legend(names: dict[str, str]) -> str | None:
    """"A = lora_banking_quickstart, B = ..." when labels() shortened any name."""
    shortened = [f"{label} = {m}" for m, label in names.items() if label != m]
    return "models: " + ", ".join(shortened) if shortened else None
