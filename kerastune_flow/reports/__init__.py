"""The one builder every report uses: a `Report` (findings, a table, figures) written as report.md
and as one self-contained report.html (plots inlined as data URIs, so the file can be mailed or
opened from anywhere), and the Markdown and HTML tables it is made of."""

from __future__ import annotations

import base64
import dataclasses
import html
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kerastune_flow import rundir

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.caution{color:#a00}"
    "figure{display:inline-block;margin:1em;vertical-align:top}img{max-width:100%}"
)


def cell(value: Any, fmt: str | Callable[[Any], str] = "{}") -> str:
    """A table cell as text: "-" for a missing value, else the value through `fmt` (a format
    string such as "{:.4f}", or a function)."""
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, one string per line."""
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *["| " + " | ".join(row) + " |" for row in rows],
    ]


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table with every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_figure(path: Path, caption: str) -> str:
    """A PNG file as an inlined <figure>."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    image = f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{encoded}">'
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def html_page(title: str, body: Sequence[str]) -> str:
    """A whole self-contained page around `body` (HTML fragments)."""
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


@dataclasses.dataclass(frozen=True)
class Report:
    """What a report says, in the order both files show it.

    Attributes:
        title: the heading.
        findings: sentences, a bullet list under the heading.
        header: the table's column titles.
        rows: the table's cells, as text.
        figures: PNG files by name, under the table (captioned by their name).
        caution: a warning set apart from the findings in bold (red in HTML), or None.
        notes: paragraphs between the findings and the table.
        footnotes: paragraphs after the table.
        page_title: the HTML page's title (default: `title`).
    """

    title: str
    findings: Sequence[str]
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    figures: Mapping[str, Path] = dataclasses.field(default_factory=dict)
    caution: str | None = None
    notes: Sequence[str] = ()
    footnotes: Sequence[str] = ()
    page_title: str | None = None

    def markdown(self) -> str:
        """The report as Markdown (figures linked by file name, beside it)."""
        lines = [f"# {self.title}", "", *[f"- {line}" for line in self.findings], ""]
        lines += [f"**{self.caution}**", ""] if self.caution else []
        for paragraph in self.notes:
            lines += [paragraph, ""]
        lines += [*md_table(self.header, self.rows), ""]
        for paragraph in self.footnotes:
            lines += [paragraph, ""]
        lines += [f"![{name}]({Path(path).name})" for name, path in self.figures.items()]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        """The report as one self-contained HTML page (figures inlined)."""
        body = [
            f"<h1>{html.escape(self.title)}</h1>",
            "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in self.findings) + "</ul>",
        ]
        if self.caution:
            body.append(f"<p class='caution'><strong>{html.escape(self.caution)}</strong></p>")
        body += [f"<p>{html.escape(paragraph)}</p>" for paragraph in self.notes]
        body.append(html_table(self.header, self.rows))
        body += [f"<p>{html.escape(paragraph)}</p>" for paragraph in self.footnotes]
        body += [html_figure(path, name.replace("_", " ")) for name, path in self.figures.items()]
        return html_page(self.page_title or self.title, body)

    def write(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Writes FOLDER/report.md and FOLDER/report.html (each atomically); returns their paths."""
        md_path, html_path = Path(folder) / REPORT_MD, Path(folder) / REPORT_HTML
        rundir.atomic_write_text(md_path, self.markdown())
        rundir.atomic_write_text(html_path, self.html())
        return md_path, html_path
