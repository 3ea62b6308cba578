"""The HTML report as a browser shows it: facts table (status, took, reason), event timeline, every plot decoding,
rendered by headless Chromium into a screenshot that is not blank (the Chromium test skips where none is installed).
The page is a Jinja2 template shipped as package data: every section must be on the page, ledger text escaped, and
pyproject must ship each template file."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageStat

from agent.cli import cli
from agent.config import AgentConfig
from agent.report import MAX_EVENT_ROWS, TEMPLATE, EventRow, FactRow, ReportData, ReportRow, render_report
from agent.workspace import Workspace
from conftest import make_tiny_llama, rand_delta, toy_tokenizer
from editors.arch import weight_view
from evaluators.probes.suite import TOOK_PROBE
from memory.ledger import Ledger
from memory.model_sync import attach, commit_applied, rollback
from memory.record import FactRecord

LAYERS = [1, 2]
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("<h1>kagent report: tiny</h1>", "<div id='plots'>", "<h2 id='batches'>Batches</h2>",
            "<h2 id='facts'>Facts</h2>", "<h2 id='events'>Events</h2>", "committed batches</span>")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def record(i: int) -> FactRecord:
    return FactRecord(subject=f"City{i}", prompt="{} is the capital of", target=f"Land{i}")


def commit(ledger: Ledger, model, ids: list[int], seed: int) -> int:
    delta = rand_delta(model, LAYERS, seed)
    delta.apply(model)
    keys = {layer: torch.randn(weight_view(model, layer).shape[1], len(ids)) for layer in LAYERS}
    after = {"known_acc": 0.8 - 0.01 * seed, "perplexity": 20 + seed, "retention": 1.0, "efficacy": 0.9,
             "norm_ratio.1": 1 + 0.01 * seed, "norm_drift.1": 0.01 * seed, "within_mean": 0.1, "prior_mean": 0.05}
    return commit_applied(ledger, model, ledger.facts(ids=ids), delta, keys, {"after": after})


@pytest.fixture
def ws(tmp_path) -> Path:
    """Three committed batches (one rolled back), a bisection, a quarantine, a consolidation event and took probes."""
    root = Workspace.create(tmp_path / "ws", AgentConfig(model="tiny")).root
    model = make_tiny_llama(len(toy_tokenizer()))
    with Ledger(root / "ledger") as ledger:
        attach(ledger, model, LAYERS)
        ids = ledger.add_facts([record(i) for i in range(8)])
        for n, seed in ((0, 1), (2, 2), (4, 3)):
            commit(ledger, model, ids[n:n + 2], seed)
        ledger.log_event("bisect", "bisecting 4 facts: perplexity 31.2 > 1.05 x baseline 20", data={"facts": ids[6:]})
        ledger.quarantine([ids[6]], "probe: perplexity 31.2 > 1.05 x baseline 20")
        rollback(ledger, 3, model, reason="wrong source")
        ledger.log_event("consolidated", "consolidated batches 1, 2 into batch 4", data={"batches": [1, 2]})
        ledger.add_probes(1, [{"fact_id": ids[0], "kind": TOOK_PROBE, "prompt": "p", "expected": "Land0",
                               "output": "Land0", "correct": True},
                              {"fact_id": ids[1], "kind": TOOK_PROBE, "prompt": "p", "expected": "Land1",
                               "output": "Paris", "correct": False}])
    return root


def make_report(ws: Path, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "report.html"
    res = CliRunner().invoke(cli, ["report", "--out", str(out), "--workspace", str(ws)])
    assert res.exit_code == 0, res.output
    assert res.output == f"wrote {out} (2 batches, 8 of 8 facts, 7 events)\n"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>"), page[:200]
    missing = [s for s in SECTIONS if s not in page]
    assert not missing, f"the rendered page lacks {missing}"
    return out, page


def row_of(page: str, fact: str) -> str:
    return re.search(rf"<tr><td class='num'>{fact}</td>.*?</tr>", page).group(0)


def test_report_lists_facts_with_status_took_and_reason_and_the_events(ws, tmp_path):
    _, page = make_report(ws, tmp_path)
    assert "took (greedy answer = target)" in page
    assert "yes <span class='muted'>(Land0)</span>" in row_of(page, "f1")
    assert ">no <span class='muted'>(Paris)</span>" in row_of(page, "f2")
    assert "not checked" in row_of(page, "f3")
    assert "rolled_back" in row_of(page, "f5") and "batch 3 rolled back: wrong source" in row_of(page, "f5")
    assert "quarantined" in row_of(page, "f7") and "perplexity 31.2" in row_of(page, "f7")
    events = page[page.index("id='events'"):]
    for text in ("bisecting 4 facts", "quarantined 1 fact(s)", "rolled back batch 3", "consolidated batches 1, 2"):
        assert text in events
    assert events.index("consolidated batches") < events.index("rolled back batch 3")  # newest first
    assert "committed batch 1" not in events  # commits are on the timeline only


def test_the_event_table_is_capped():
    events = [EventRow(float(i), "defer", None, f"deferred fact {i}") for i in range(MAX_EVENT_ROWS + 5)]
    page = render_report(ReportData("capped", [], events=events))
    table = page[page.index("id='events'"):]
    assert table.count("<tr>") == MAX_EVENT_ROWS + 1  # the header and the newest MAX_EVENT_ROWS
    assert f"deferred fact {MAX_EVENT_ROWS + 4}<" in table and "deferred fact 4<" not in table


def test_ledger_text_is_escaped_and_numbers_formatted():
    rows = [ReportRow(1, "2026-01-01 00:00:00", 1, 1, "committed", "encore<b>", {"known_acc": 0.876543})]
    fact = FactRow(1, "<script>alert('x')</script> is", "Pa'ris & co", "applied", 1, None, took=True,
                   answer="Pa\u202eris")
    page = render_report(ReportData("r <i>", rows, facts=[fact], facts_total=1))
    assert "<script>" not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; is" in page
    assert "Pa&#39;ris &amp; co" in page and "encore&lt;b&gt;" in page and "<title>r &lt;i&gt;</title>" in page
    assert "\u202e" not in page and "(Pa\\u202eris)" in page  # shown() before escaping
    assert "<td class='num'>0.8765</td>" in page


def test_pyproject_ships_every_template():
    """An editable install reads the templates from the source tree; a wheel holds only what package-data names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["agent"]
    templates = [p.relative_to(ROOT / "agent").as_posix() for p in (ROOT / "agent" / "templates").iterdir()]
    assert f"templates/{TEMPLATE}" in templates
    assert [t for t in templates if not any(fnmatch(t, pat) for pat in patterns)] == []


def plots(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_headless_chromium_renders_the_report_and_decodes_every_plot(ws, tmp_path):
    out, page = make_report(ws, tmp_path)
    images = plots(page)
    assert len(images) == 4
    for png in images:
        img = Image.open(io.BytesIO(png))
        img.load()
        assert img.width > 300 and img.height > 150
    # the browser's own decoding: a copy of the page writes each image's decoded width into the DOM
    probe = tmp_path / "probe.html"
    # and the style sheet applied: a status badge's text is white on its colour
    probe.write_text(page.replace("</body>", "<script>document.body.setAttribute('data-widths', Array.from("
                                  "document.images, i => i.complete ? i.naturalWidth : -1).join(','));"
                                  "document.body.setAttribute('data-badge', getComputedStyle("
                                  "document.querySelector('.badge')).color)</script></body>"), encoding="utf-8")
    dom = chromium("--dump-dom", probe.as_uri(), user_dir=tmp_path / "profile-dom")
    widths = [int(w) for w in re.search(r'data-widths="([-\d,]*)"', dom.stdout).group(1).split(",")]
    assert len(widths) == 4 and all(w > 300 for w in widths), widths
    assert re.search(r'data-badge="([^"]*)"', dom.stdout).group(1) == "rgb(255, 255, 255)"
    shot = tmp_path / "report.png"
    res = chromium(f"--screenshot={shot}", "--window-size=1400,2600", out.as_uri(), user_dir=tmp_path / "profile")
    assert shot.exists(), res.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 2600)
    stat = ImageStat.Stat(img.convert("L"))
    assert stat.stddev[0] > 20, "screenshot is (nearly) one colour"
    assert len(img.getcolors(maxcolors=1 << 20) or []) > 100  # text, plots and badges, not a blank page
