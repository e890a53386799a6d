"""Reports: one self-contained HTML file of what `eval`, `direction`, `optimise` and `explain` measured.

The page (`page`) is plain HTML with inline CSS and the charts (`charts`) inline SVG drawn by
matplotlib, so it opens from disk offline; `sections` turns each source into page content.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gguf_abliterate import __version__
from gguf_abliterate.direction.explain import Explanation
from gguf_abliterate.evaluate.report import ModelReport


@dataclass(frozen=True)
class Evaluated:
    """What `eval` measured: the reports (base first), the prompts, the settings."""

    reports: Sequence[ModelReport]
    harmful: Sequence[str]
    harmless: Sequence[str]
    settings: Mapping[str, object] = field(default_factory=dict)


def write_report(path: Path, title: str, *, evaluated: Evaluated | None = None,
                 direction_files: Sequence[Path] = (), stage_times: Sequence[tuple[str, float]] = (),
                 edit_seconds: Mapping[str, float] | None = None, explained: Explanation | None = None) -> None:
    """Write the report with every section its sources allow, in reading order: the summary,
    the judge, requantization, what a direction means, the search, the direction, stage
    times, then every answer."""
    from gguf_abliterate.formats.direction_file import load_direction
    from gguf_abliterate.report import sections as S
    from gguf_abliterate.report.page import Page

    page = Page(title, f"gguf-abliterate {__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    answers = None
    if evaluated is not None:
        infos = [S.model_info(Path(r.path)) for r in evaluated.reports]
        for t, c in S.summary(evaluated.reports, infos, evaluated.settings, edit_seconds or {}):
            page.add(t, c)
        requant = S.requantization(infos)
        if requant is not None:
            page.add(*requant)
        answers = S.answers(evaluated.reports, infos, evaluated.harmful, evaluated.harmless)
    if explained is not None:
        from gguf_abliterate.report.explained import explained as explained_sections

        for t, c in explained_sections(explained):
            page.add(t, c)
    for f in direction_files:
        for t, c in S.direction_sections(load_direction(f), f.name):
            page.add(t, c)
    if stage_times:
        page.add(*S.stages(stage_times))
    if answers is not None:
        page.add(*answers)
    page.write(path)


def claim_report(path: Path, inputs: Sequence[Path], force: bool) -> None:
    """Before any long work: the report can be written (`claim_outputs`) and its charts drawn
    (matplotlib installed)."""
    from gguf_abliterate.gguf_io.atomic import claim_outputs
    from gguf_abliterate.report.charts import require_matplotlib

    claim_outputs([path], list(inputs), force)
    require_matplotlib()
