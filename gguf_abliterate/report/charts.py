"""Charts as inline SVG, drawn by matplotlib's SVG backend (imported only when a report is made).

A report must open from disk with nothing fetched, so each SVG is cleaned for inlining into
HTML: the XML declaration, DOCTYPE, RDF metadata and namespace declarations go (HTML5 puts an
inline `<svg>` in the SVG namespace by itself), text stays text (`svg.fonttype: none`, the
page's fonts) and ids are salted per chart, so two charts on one page never share one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gguf_abliterate.errors import UserError

WIDTH, HEIGHT = 7.2, 3.0  # inches; 72 px each in the SVG
COLOURS = ("#1f6fb2", "#d9681b", "#2e9348", "#b8322c", "#7d55b4", "#7a5a49", "#c0479b", "#6b6b6b")
_SALTS = iter(range(1, 1 << 30))  # a fresh id salt per chart in this process


def require_matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("reports draw their charts with matplotlib: pip install 'gguf-abliterate[report]'") from None
    return matplotlib, Figure


def _figure(height: float = HEIGHT) -> Any:
    _, Figure = require_matplotlib()
    fig = Figure(figsize=(WIDTH, height))
    return fig, fig.add_subplot()


def _svg(fig: Any) -> str:
    """The figure as an SVG element ready to inline (no declaration, DOCTYPE, metadata or URL)."""
    matplotlib, _ = require_matplotlib()
    buf = io.StringIO()
    style = {"svg.fonttype": "none", "svg.hashsalt": f"chart{next(_SALTS)}", "font.size": 9}
    with matplotlib.rc_context(style):
        fig.tight_layout()
        fig.savefig(buf, format="svg", bbox_inches="tight",  # grown to hold a legend outside the axes
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return svg.replace('<svg ', '<svg role="img" ', 1)


@dataclass(frozen=True)
class Series:
    """One line over the blocks: values (NaN where not measured), its label and y axis."""

    label: str
    values: np.ndarray
    right: bool = False  # on the second y axis


def blocks_chart(series: Sequence[Series], ylabel: str, y2label: str | None = None,
                 mark: int | None = None, mark_label: str = "chosen", logy2: bool = False) -> str:
    """Lines of per-block values (points where a series has gaps), block `mark` marked."""
    fig, ax = _figure()
    ax2 = ax.twinx() if any(s.right for s in series) else None
    handles = []
    for i, s in enumerate(series):
        target = ax2 if s.right and ax2 is not None else ax
        x = np.arange(len(s.values))
        ok = np.isfinite(s.values)
        style = "o-" if ok.sum() < len(ok) else "-"
        (h,) = target.plot(x[ok], s.values[ok], style, color=COLOURS[i % len(COLOURS)], label=s.label,
                           markersize=3, linewidth=1.4)
        handles.append(h)
    if mark is not None:
        ax.axvline(mark, color="#444", linestyle=":", linewidth=1)
        ax.annotate(f"{mark_label} ({mark})", (mark, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -10), textcoords="offset points", fontsize=8, color="#444")
    ax.set_xlabel("block")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel(ylabel)
    if ax2 is not None:
        ax2.set_ylabel(y2label or "")
        if logy2:
            ax2.set_yscale("log")
    _legend_above(ax, handles)
    ax.grid(alpha=0.25)
    return _svg(fig)


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _legend_above(ax: Any, handles: Any = None) -> None:
    """The legend above the plot, where it hides no line: in one row, or one entry a row when
    the labels are long."""
    entries = handles if handles is not None else ax.get_legend_handles_labels()[0]
    long = max((len(h.get_label()) for h in entries), default=0) > 28
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.01), ncols=1 if long else 4, fontsize=8,
              frameon=False, borderaxespad=0)


@dataclass(frozen=True)
class Point:
    """One trial of a search: its two objectives and how it is marked."""

    kl: float
    refusal: float
    front: bool = False
    pick: bool = False


def front_chart(points: Sequence[Point], xlabel: str, ylabel: str) -> str:
    """Every trial (KL on a log axis, refusal ratio), the Pareto front as a step line, the pick
    as a star."""
    fig, ax = _figure(3.4)
    kl = np.array([p.kl for p in points], np.float64)
    ref = np.array([p.refusal for p in points], np.float64)
    front = np.array([p.front for p in points], bool)
    ax.scatter(kl[~front], ref[~front], s=12, color="#9aa7b4", label="trial", zorder=2)
    order = np.argsort(kl[front])
    ax.step(kl[front][order], ref[front][order], where="post", color=COLOURS[0], linewidth=1.2, zorder=3)
    ax.scatter(kl[front], ref[front], s=18, color=COLOURS[0], label="Pareto front", zorder=4)
    picks = [p for p in points if p.pick]
    for p in picks:
        ax.scatter([p.kl], [p.refusal], s=150, marker="*", color=COLOURS[1], edgecolor="#222", linewidth=0.6,
                   label="pick", zorder=5)
    if (kl > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _legend_above(ax)
    ax.grid(alpha=0.25, which="both")
    return _svg(fig)


def grouped_bars(groups: Sequence[str], bars: Mapping[str, Sequence[float]], ylabel: str, logy: bool = False) -> str:
    """Bars per group (x) and series (colour); NaN draws no bar."""
    fig, ax = _figure()
    n = max(len(bars), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(bars.items()):
        v = np.asarray(values, np.float64)
        ax.bar(x + (i - (n - 1) / 2) * width, np.where(np.isfinite(v), v, 0), width, label=label,
               color=COLOURS[i % len(COLOURS)])
    ax.set_xticks(x, groups)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    _legend_above(ax)
    ax.grid(alpha=0.25, axis="y")
    return _svg(fig)


def heat_map(values: np.ndarray, xlabel: str, ylabel: str, label: str, lo: float | None = None,
             hi: float | None = None, square: bool = True) -> str:
    """A matrix as colours (rows on y, from the top), with a colour bar; NaN left blank."""
    fig, ax = _figure(5.2 if square else HEIGHT)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r" if lo is not None and lo < 0 else "viridis",
                      vmin=lo, vmax=hi, aspect="equal" if square else "auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.yaxis.set_major_locator(_integer_ticks())
    return _svg(fig)
