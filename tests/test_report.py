"""HTML reports: the demo's, opened in a real headless Chromium, and each command's `--report`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as the env notes say: headless, and none of Chromium's own network traffic
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("needs Debian's chromium (apt-get install chromium); CI installs it")
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


class Tables(HTMLParser):
    """Every table with an id, as rows of cell texts; every href and src; the svg count."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.links: list[str] = []
        self.svgs = 0
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("href", "src", "xlink:href") and v is not None]
        if tag == "svg":
            self.svgs += 1
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> Tables:
    t = Tables()
    t.feed(html)
    return t


def assert_offline(html: str) -> None:
    """Nothing a browser would fetch: no URL at all, links and url() only inside the page."""
    assert not re.search(r"https?://|url\((?!#)|@import|<script|<link|<img", html, re.I)
    links = parse(html).links
    assert all(link.startswith("#") for link in links), links


def test_demo_report_in_a_browser(tiny_demo: tuple[Path, Any], tmp_path: Path) -> None:
    """The demo's report renders in headless Chromium: the screenshot is not blank and shows the
    charts; the DOM's summary table holds what the evaluation measured (report.json)."""
    from gguf_abliterate.formats.direction_file import load_direction

    out, run = tiny_demo
    assert run.returncode == 0, run.stderr
    page = out / "report.html"
    html = page.read_text(encoding="utf-8")
    assert page.stat().st_size < 2_000_000
    assert_offline(html)

    shot = tmp_path / "shot.png"
    r = chromium(f"--screenshot={shot}", "--window-size=1280,2400", page.resolve().as_uri(), profile=tmp_path / "p1")
    assert shot.is_file(), r.stderr
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (2400, 1280)
    not_white = (pixels < 235).any(axis=2).mean()
    assert not_white > 0.02, f"only {not_white:.1%} of the page is drawn on"
    colours = len(np.unique(pixels.reshape(-1, 3) // 8, axis=0))
    assert colours > 50
    chart_blue = (np.abs(pixels - np.array([0x1F, 0x6F, 0xB2])).max(axis=2) < 12).sum()
    assert chart_blue > 200, "no chart line or point drawn in the charts' first colour"

    r = chromium("--dump-dom", page.resolve().as_uri(), profile=tmp_path / "p2")
    assert r.returncode == 0, r.stderr
    dom = parse(r.stdout)
    measured = json.loads((out / "report.json").read_text())["models"]
    rows = dom.tables["summary-table"]
    header, body = rows[0], rows[1:]
    assert len(body) == len(measured) == 4
    col = {name: header.index(name) for name in ("model", "harmful refused", "harmless refused", "KL vs base")}
    for row, m in zip(body, measured):
        assert row[col["model"]] == Path(m["path"]).name
        assert row[col["harmful refused"]] == f"{m['harmful_refusals']}/{m['harmful_total']}"
        assert row[col["harmless refused"]] == f"{m['harmless_refusals']}/{m['harmless_total']}"
        kl = m["kl_vs_base"]
        assert row[col["KL vs base"]] == ("-" if kl is None else f"{kl:.4f}")
    assert body[0][header.index("edit")] == "original"
    assert body[1][header.index("edit")].startswith("abliterate x1")
    assert body[3][header.index("edit")].startswith("reverse x1")
    assert all(r[header.index("edit time")].endswith(" s") for r in body[1:])
    # charts: requantization, the direction's statistics and layer scores, the search's strengths, and its
    # trials where any got past the refusal guard (a note says why not otherwise)
    trials = json.loads(load_direction(out / "optimised.safetensors").metadata["trials"])
    scored = any(t["kl"] is not None for t in trials)
    assert dom.svgs == 4 + scored
    assert scored or "there is no KL to chart" in html
    for table in ("requant-table", "front-table", "layer-table", "stage-table"):
        assert len(dom.tables[table]) > 1, table
    # every answer of every model is in the page, escaped
    harmful = json.loads((out / "report.json").read_text())["harmful_prompts"]
    assert all(p.replace("'", "&#x27;") in html for p in harmful)


def test_report_front_table_matches_the_result_file(tiny_demo: tuple[Path, Any]) -> None:
    """The search section lists exactly the Pareto front of the trials the result file holds,
    with the pick marked; the layer table the blocks the direction file scored."""
    from gguf_abliterate.formats.direction_file import load_direction
    from gguf_abliterate.optimise.study import TrialRecord, pareto_front

    out, _ = tiny_demo
    dom = parse((out / "report.html").read_text(encoding="utf-8"))
    result = load_direction(out / "optimised.safetensors")
    front = pareto_front([TrialRecord.from_json(t) for t in result.trials])
    rows = dom.tables["front-table"][1:]
    assert [int(r[0]) for r in rows] == [t.number for t in front]
    assert [r[0] for r in rows if r[-1] == "pick"] == [result.metadata["chosen_trial"]]
    measured = load_direction(out / "direction.safetensors")
    scored = np.flatnonzero(np.isfinite(measured.statistics["layer_score"]))
    layers = dom.tables["layer-table"][1:]
    assert [int(r[0]) for r in layers] == list(scored)
    assert [r[0] for r in layers if r[-1] == "chosen"] == [measured.metadata["layer"]]
    assert [r[3] for r in layers] == measured.metadata["scored_prompts"].split(",")  # prompts each was scored on


def test_each_command_writes_its_report(tiny: dict[str, Path], tiny_demo: tuple[Path, Any], tmp_path: Path) -> None:
    """`direction --report` charts the blocks and reads the direction as `explain` does; `eval
    --report` the comparison (plus any `--report-direction`); each page stands alone."""
    model = tiny["llama-nobias"]
    d, d_html = tmp_path / "d.safetensors", tmp_path / "d.html"
    run = cli("direction", model, "-o", d, "--score-prompts", "2", "--report", d_html, "-q")
    assert run.returncode == 0, run.stderr
    page = parse(d_html.read_text(encoding="utf-8"))
    assert page.svgs == 2 + 4 and "layer-table" in page.tables and "summary-table" not in page.tables
    assert "What it says" in d_html.read_text(encoding="utf-8")  # explain's sections

    edited = tmp_path / "e.gguf"
    assert cli(model, edited, "--direction", d, "-q").returncode == 0
    e_html = tmp_path / "e.html"
    demo_out, _ = tiny_demo
    run = cli("eval", model, edited, "-n", "2", "--max-tokens", "4", "--report", e_html,
              "--report-direction", demo_out / "optimised.safetensors")
    assert run.returncode == 0, run.stderr
    # progress bars go to stderr only: nothing of them in the piped output or the page
    assert "responses:" in run.stderr and "responses:" not in run.stdout and "\r" not in run.stdout
    html = e_html.read_text(encoding="utf-8")
    assert "responses:" not in html and "prompt/s" not in html
    assert_offline(html)
    page = parse(html)
    assert [r[0] for r in page.tables["summary-table"][1:]] == [model.name, edited.name]
    assert "front-table" in page.tables and "requant-table" in page.tables
    # the requantization table holds what the edited file recorded
    from gguf_abliterate.gguf_io import Model

    m = Model(edited)
    recorded = json.loads(m.get("abliterate.requant_report"))
    m.close()
    assert sorted(r[2] for r in page.tables["requant-table"][1:]) == sorted(recorded)


def test_optimise_report(tiny: dict[str, Path], tmp_path: Path) -> None:
    out, page = tmp_path / "s.safetensors", tmp_path / "s.html"
    run = cli("optimise", tiny["llama-nobias"], "-o", out, "--trials", "3", "--startup-trials", "3",
              "--score-prompts", "2", "--confirm-tokens", "2", "--bake-checks", "0", "--report", page, "-q")
    assert run.returncode == 0, run.stderr
    tables = parse(page.read_text(encoding="utf-8"))
    assert len(tables.tables["front-table"]) > 1 and "layer-table" not in tables.tables


@pytest.mark.parametrize("args,needle", [
    (["eval", "{model}", "--report-direction", "{model}"], "give --report FILE.html too"),
    (["eval", "{model}", "--report", "{tmp}/no/such/r.html"], "no such directory"),
    (["eval", "{model}", "--report", "{tmp}"], "is a directory"),
    (["eval", "{model}", "--report", "{model}"], "is one of this command's inputs"),
    (["eval", "{model}", "--report", "{tmp}/r.html", "--report-direction", "{tmp}/x.npy"], "no such direction file"),
    (["direction", "{model}", "-o", "{tmp}/d.npy", "--report", "{tmp}/r.html"], "only a .safetensors output"),
    (["optimise", "{model}", "--join", "sqlite:///{tmp}/s.db", "--report", "{tmp}/r.html"], "joining worker"),
])
def test_report_errors_come_first(args: list[str], needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    """A report that cannot be written is refused before any model runs, in one line."""
    run = cli(*(a.format(model=tiny["llama"], tmp=tmp_path) for a in args))
    assert run.returncode != 0 and needle in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "d.npy").exists()


def test_page_escapes_text_and_marks_numbers() -> None:
    from gguf_abliterate.report.page import Page, table

    p = Page("a <b> & 'c'")
    p.add("Answers", table(["model", "KL"], [["<script>alert(1)</script>", 0.5]]))
    html = p.html()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<title>a &lt;b&gt; &amp; &#x27;c&#x27;</title>" in html
    assert '<td class="num">0.5</td>' in html


def test_chart_labels_keep_what_tells_models_apart() -> None:
    from gguf_abliterate.report.sections import distinct

    assert distinct(["Qwen-0.5B-abliterated.gguf", "Qwen-0.5B-reverse.gguf"]) == ["abliterated.gguf", "reverse.gguf"]
    assert distinct(["a.gguf", "a.gguf.bak"]) == ["a.gguf", "a.gguf.bak"]  # a short stem stays
    assert distinct(["model-q4.gguf", "model-q4.gguf"]) == ["model-q4.gguf", "model-q4.gguf"]  # nothing left
    assert distinct(["model.gguf"]) == ["model.gguf"]
    assert distinct(["x-1.gguf", "y-2.gguf"]) == ["x-1.gguf", "y-2.gguf"]
