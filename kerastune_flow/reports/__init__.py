"""The parts every report shares: Markdown and HTML tables, and one self-contained HTML page
(plots inlined as data URIs, so the file can be mailed or opened from anywhere)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.caution{color:#a00}"
    "figure{display:inline-block;margin:1em;vertical-align:top}img{max-width:100%}"
)


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
