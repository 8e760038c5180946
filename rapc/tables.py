"""Result tables built once as text rows, then written as Markdown or printed with rich."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table as RichTable


@dataclass(frozen=True)
class Table:
    title: str
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]
    label_columns: int = 1  # the first columns hold names (left-aligned); the rest hold figures
    legend: str = ""  # under the table: what short column names mean

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", "| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.legend:
            lines += ["", self.legend]
        return "\n".join(lines) + "\n"

    def rich(self) -> RichTable:
        out = RichTable(title=self.title, caption=self.legend or None, caption_justify="left")
        for i, header in enumerate(self.headers):
            if i < self.label_columns:  # names are never cut short; long figure headers (attack labels) wrap instead
                width = max(len(str(text)) for text in (header, *(row[i] for row in self.rows)))
                out.add_column(header, justify="left", no_wrap=True, min_width=width)
            else:  # a one-word header cannot wrap: give it its width rather than an ellipsis
                out.add_column(header, justify="right", min_width=None if " " in header else len(header))
        for row in self.rows:
            out.add_row(*row)
        return out
