"""The page as HTML: its parts (Section, Figure, Table), readable tables, and the files it is written to.

Every text is escaped in `render_html`, so no value read from a run's files can add
markup; `write_report` writes report.html, figures/*.png and tables/*.csv, each file
atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.files import atomic_write, write_text


@dataclass
class Figure:
    name: str  # file stem
    caption: str
    png: bytes


@dataclass
class Table:
    name: str
    caption: str
    rows: list[dict]
    transpose: bool = False  # show one row per column (a wide table of a few rows, e.g. per kind of example)


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: str | None = None  # why there is nothing here, and the command that makes it


_PERCENT_WORDS = ("acc", "share", "rate", "_after", "_before", "fraction")  # column names holding fractions
_NOT_MEASURED = "–"


def _header(key: str) -> str:
    """A column name for people: snake_case as words, `_acc` as "accuracy (%)" and fractions marked "(%)"."""
    words = key.replace("_acc", " accuracy").replace("_", " ").strip()
    return words + (" (%)" if _is_percent_column(key) else "")


def _is_percent_column(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _PERCENT_WORDS) and not any(w in k for w in ("epoch", "units", "layers", "auroc"))


def _cell_text(key: str, v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v in ("None", "nan", "")):
        return _NOT_MEASURED
    if isinstance(v, str):  # a CSV cell: a number written as text is still a number
        try:
            v = float(v) if re.fullmatch(r"-?\d+\.\d*(e-?\d+)?|-?\d+e-?\d+", v.strip()) else v
        except ValueError:
            pass
    if isinstance(v, float):
        if _is_percent_column(key) and -1.0 <= v <= 1.0:
            return f"{100 * v:.1f}"
        return f"{v:.4g}"
    return str(v)


def _table_html(rows: list[dict], limit: int = 40, *, transpose: bool = False) -> str:
    """A table people can read inside the page: readable headers, fractions as percentages with one decimal,
    "–" for what was not measured (with a footnote); with `transpose` a wide table of few rows shows one row
    per column; any other wide table scrolls inside its own box (long tables fold into <details>: render_html)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[_cell_text(k, r.get(k)) for k in keys] for r in rows[:limit]]
    empty = [j for j in range(len(keys)) if len(keys) > 1 and all(c[j] == _NOT_MEASURED for c in cells)]
    if empty:  # a column with nothing measured (e.g. rare-train without rare examples): in the CSV only
        keys = [k for j, k in enumerate(keys) if j not in empty]
        cells = [[v for j, v in enumerate(c) if j not in empty] for c in cells]
    if transpose and len(cells) <= 6:  # e.g. flipping's per-kind table: 13 columns, 2 rows
        head = f"<th>{html.escape(_header(keys[0]))}</th>" + "".join(
            f"<th>{html.escape(c[0])}</th>" for c in cells)
        body = "".join(f"<tr><th>{html.escape(_header(k))}</th>" + "".join(
            f"<td>{html.escape(c[j])}</td>" for c in cells) + "</tr>" for j, k in enumerate(keys) if j > 0)
    else:
        head = "".join(f"<th>{html.escape(_header(k))}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in c) + "</tr>" for c in cells)
    table = f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    notes = []
    if any(v == _NOT_MEASURED for c in cells for v in c):
        notes.append(f"{_NOT_MEASURED}: not measured or not applicable (e.g. a run without rare examples).")
    if len(rows) > limit:
        notes.append(f"{len(rows) - limit} more rows in the CSV.")
    return table + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}\
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}.missing{color:#a60}.note{color:#555;font-size:.9em}.holds{color:#070}.fails{color:#b00}
.wide{max-width:100%;overflow-x:auto}details{margin:.5em 0}summary{cursor:pointer;color:#555;font-size:.9em}
@media print{body{max-width:none;margin:0}h1,h2,h3{break-after:avoid;page-break-after:avoid}
h2+*,h2+*+*{break-before:avoid;page-break-before:avoid}figure,tr,img{break-inside:avoid;page-break-inside:avoid}
.wide{overflow:visible}table{font-size:.7em}td,th{word-break:break-word}details>*{display:block}}"""


def _text_html(text: str) -> str:
    """Plain text (which may hold values read from a run's files) as HTML: everything escaped, `code` in backticks."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(str(text)))


def render_html(title: str, intro: list[str], sections: list[Section]) -> str:
    """The page. Every text is escaped here (intro lines and notes are plain text), so no value from a
    run's files, however tampered, can add markup or script."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{_text_html(line)}</p>" for line in intro]
    toc = "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a>{' (missing)' if s.missing else ''}</li>"
                  for i, s in enumerate(sections))
    parts.append(f"<ul>{toc}</ul>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.missing:
            parts.append(f"<p class='missing'>Missing: {html.escape(s.missing)}</p>")
        for note in s.notes:
            parts.append(f"<p class='note'>{_text_html(note)}</p>")
        for f in s.figures:
            data = base64.b64encode(f.png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(f.name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
        for t in s.tables:  # after the figures; a long one folded (open in print)
            if not (t.name.startswith("summary") or len(t.rows) <= 40):
                parts.append(f"<p class='note'>{html.escape(t.caption)}: {len(t.rows)} rows in tables/{t.name}.csv</p>")
            elif len(t.rows) > 12 and not t.name.startswith("summary"):
                parts.append(f"<details><summary>{html.escape(t.caption)} ({len(t.rows)} rows; tables/{t.name}.csv)"
                             f"</summary>{_table_html(t.rows, transpose=t.transpose)}</details>")
            else:
                parts.append(f"<p class='note'>{html.escape(t.caption)}</p>"
                             f"{_table_html(t.rows, transpose=t.transpose)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def write_report(out_dir: Path, title: str, intro: list[str], sections: list[Section]) -> Path:
    """Write report.html, figures/*.png and tables/*.csv under `out_dir`; return the HTML path."""
    out_dir = Path(out_dir)
    for s in sections:  # each file atomically: a full disk leaves the files already there unchanged
        for f in s.figures:
            png = f.png
            atomic_write(out_dir / "figures" / f"{f.name}.png", lambda p, png=png: p.write_bytes(png))
        for t in s.tables:
            _write_csv(out_dir / "tables" / f"{t.name}.csv", t.rows)
    page = out_dir / "report.html"
    write_text(page, render_html(title, intro, sections))
    return page
