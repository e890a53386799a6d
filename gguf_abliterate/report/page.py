"""One self-contained HTML page: inline CSS and SVG, no script, nothing fetched.

Every piece of text goes through `esc`; only `Html` (what these helpers and the charts
build) is inserted as it is. Links point inside the page only, so the file opens from disk,
offline, and shows the same everywhere.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gguf_abliterate.gguf_io.atomic import atomic_path


class Html(str):
    """Markup that is inserted as it is (anything else is escaped)."""


def esc(value: object) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def join(parts: Iterable[object]) -> Html:
    return Html("".join(esc(p) for p in parts))


def tag(name: str, *content: object, **attrs: object) -> Html:
    """`<name attrs>content</name>`; attribute names ending in `_` lose it (`class_`)."""
    text = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Html(f"<{name}{text}>{join(content)}</{name}>")


def para(*content: object, **attrs: object) -> Html:
    return tag("p", *content, **attrs)


def table(headers: Sequence[object], rows: Iterable[Sequence[object]], **attrs: object) -> Html:
    """A table; numbers are right-aligned."""
    def cell(kind: str, value: object) -> Html:
        numeric = isinstance(value, (int, float)) or bool(re.fullmatch(r"[-+]?[\d.,/%x]+(e[-+]?\d+)?", str(value)))
        return tag(kind, value, class_="num" if numeric else None)

    head = tag("thead", tag("tr", *(cell("th", h) for h in headers)))
    body = tag("tbody", *(tag("tr", *(cell("td", v) for v in row)) for row in rows))
    return tag("table", head, body, **attrs)


def details(summary: object, *content: object) -> Html:
    """A collapsed block: the summary line, and the content shown when it is opened."""
    return tag("details", tag("summary", summary), *content)


def figure(svg: str, caption: object) -> Html:
    """A chart (SVG from `charts`) with its caption."""
    return tag("figure", Html(svg), tag("figcaption", caption))


def badge(label: str) -> Html:
    return tag("span", label, class_=f"badge {label}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232a;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:19px;margin:30px 0 8px;border-bottom:2px solid #e3e7ec;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#5b6772;margin:0 0 12px}
nav{font-size:13px;margin:8px 0 4px}nav a{margin-right:14px;color:#1f6fb2;text-decoration:none}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #dde2e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:10px 0 18px}figcaption{color:#5b6772;font-size:12px;max-width:760px}
svg{max-width:100%;height:auto}
details{border:1px solid #e3e7ec;border-radius:6px;margin:6px 0;padding:4px 10px;background:#fbfcfd}
summary{cursor:pointer;font-weight:500}
.answers{display:grid;gap:10px;margin:8px 0}
.answer{border-left:3px solid #cfd6de;padding:2px 0 2px 8px;white-space:pre-wrap;word-break:break-word;font-size:13px}
.answer b{display:block;white-space:normal;font-size:12px;color:#5b6772}
.badge{display:inline-block;border-radius:9px;padding:0 7px;font-size:11px;margin-left:4px;background:#e3e7ec;color:#333}
.badge.refusal{background:#f6d5d3;color:#8b1f18}.badge.complies{background:#d3eedb;color:#1b6b33}
.badge.partial{background:#fbe9c8;color:#7a4d00}.badge.evades{background:#e6dcf5;color:#4b2a85}
.badge.degenerate{background:#d9d9d9;color:#222}
.note{color:#5b6772;font-size:12.5px}
"""


@dataclass
class Page:
    """A report page: a title, a line under it, and sections in order."""

    title: str
    subtitle: str = ""
    sections: list[tuple[str, Html]] = field(default_factory=list)

    def add(self, title: str, *content: object) -> None:
        self.sections.append((title, join(content)))

    def html(self) -> str:
        nav = tag("nav", *(tag("a", t, href=f"#{slug(t)}") for t, _ in self.sections)) if len(self.sections) > 1 else ""
        body = join(tag("section", tag("h2", t), c, id=slug(t)) for t, c in self.sections)
        return ("<!DOCTYPE html>\n" + tag("html", tag("head", Html('<meta charset="utf-8">'),
                                                      Html('<meta name="viewport" content="width=device-width">'),
                                                      tag("title", self.title), tag("style", Html(CSS))),
                                          tag("body", tag("main", tag("h1", self.title),
                                                          para(self.subtitle, class_="sub"), nav, body)), lang="en"))

    def write(self, path: Path) -> None:
        """Write the page atomically (nothing half-written on an error or Ctrl-C)."""
        with atomic_path(path) as tmp:
            tmp.write_text(self.html(), encoding="utf-8")
