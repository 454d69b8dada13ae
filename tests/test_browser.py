"""What a person sees: reports/report.html and the `dvc plots show` page in a real headless browser.

Debian's chromium renders each page with the network off (a dead proxy and a resolver that finds no
host); the test fails on a JavaScript error, a console.error, a failed resource or a broken image, and
on a DVC chart that did not draw. A probe script is put into a copy of the page: the first one records
errors from the start, the last one writes what it found into the DOM, which `--dump-dom` prints.
Screenshots go to the test's temporary folder and, when RLHF_SCREENSHOTS names a folder, there too.
Skipped only when chromium is not installed (`apt-get install -y chromium`; .ci/run installs it).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_evaluate_stage import evaluated  # noqa: F401  (the tiny run's report, built once per module)

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

FIRST = """<script>
window.__errors = [];
window.addEventListener('error', e => {
  const t = e.target;
  window.__errors.push(t && t !== window ? 'failed to load ' + (t.src || t.href || t.tagName) : 'error: ' + e.message);
}, true);
window.addEventListener('unhandledrejection', e => window.__errors.push('unhandled rejection: ' + e.reason));
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push('console.error: ' + args.join(' ')); __consoleError.apply(console, args); };
</script>"""
LAST = """<script>
window.addEventListener('load', () => setTimeout(() => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt || i.src.slice(0, 80));
  const charts = [...document.querySelectorAll('.vega-embed')];
  const out = document.createElement('pre');
  out.id = 'browser-probe';
  out.textContent = JSON.stringify({errors: window.__errors, broken: broken, images: document.images.length,
    charts: charts.length, drawn: charts.filter(c => c.querySelector('canvas, svg')).length});
  document.body.appendChild(out);
}, 2000));
</script>"""
OFFLINE = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]


def chromium(page: Path, *args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", *OFFLINE, "--virtual-time-budget=15000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def probe(page: Path, profile: Path) -> dict:
    """Render a probed copy of `page` (beside it, so relative links still resolve) and return the probe's report."""
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head(\s[^>]*)?>", text)
    text = (text[: head.end()] + FIRST + text[head.end():]) if head else FIRST + text
    end = text.rfind("</body>")  # the last one: inlined libraries may hold the string too
    text = text[:end] + LAST + text[end:] if end >= 0 else text + LAST
    copy = page.with_name(f"probe-{page.name}")
    copy.write_text(text, encoding="utf-8")
    res = chromium(copy, "--dump-dom", profile=profile)
    found = re.search(r'<pre id="browser-probe">(.*?)</pre>', res.stdout, re.S)
    assert found, f"chromium printed no probe result (exit {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, profile: Path, size: str = "1280,2400") -> Path:
    res = chromium(page, f"--screenshot={out}", f"--window-size={size}", profile=profile)
    assert out.is_file() and out.stat().st_size > 10_000, f"no screenshot: {res.stderr[-2000:]}"
    if os.environ.get("RLHF_SCREENSHOTS"):
        keep = Path(os.environ["RLHF_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, keep / out.name)
    return out


def test_report_renders_offline_without_errors(evaluated, tmp_path):  # noqa: F811
    _, out, _ = evaluated
    page = out / "reports" / "report.html"
    found = probe(page, tmp_path / "profile")
    assert found["errors"] == [] and found["broken"] == [], found
    assert found["images"] >= 4, found  # win rates, families, benchmarks, training curves
    screenshot(page, tmp_path / "report.png", tmp_path / "profile")


def test_dvc_plots_page_renders_offline_without_errors(evaluated, tiny_run, tmp_path):  # noqa: F811
    """`dvc plots show` with the repository's dvc.yaml and offline template, on the tiny run's files."""
    _, out, _ = evaluated
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(tiny_run.root / "plots", repo / "plots")
    shutil.copytree(out / "reports" / "plots", repo / "reports" / "plots")
    res = subprocess.run(["dvc", "plots", "show", "-o", "page"], cwd=repo, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    page = repo / "page" / "index.html"
    text = page.read_text(encoding="utf-8")
    assert not re.search(r'<(script|link)[^>]+(src|href)="https?:', text)  # the offline template: nothing fetched
    found = probe(page, tmp_path / "profile")
    assert found["errors"] == [] and found["broken"] == [], found
    # Every chart with data drew: the evaluation tables and the pretrain/SFT curves of the tiny run.
    assert found["charts"] >= 4 and found["drawn"] == found["charts"], found
    titles = re.findall(r'"title": \{"text": "([^"]+)"', text)
    assert titles and not any(t.endswith((".tsv", ".csv")) for t in titles), titles  # titled, not named by path
    screenshot(page, tmp_path / "dvc_plots.png", tmp_path / "profile", size="1280,1800")


def test_probe_catches_a_broken_image_and_a_script_error(tmp_path):
    """The check itself can fail: a missing image and a thrown error are both reported."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><img alt="gone" src="missing.png">'
                    "<script>undefinedFunction()</script></body></html>", encoding="utf-8")
    found = probe(page, tmp_path / "profile")
    assert found["broken"] == ["gone"]
    assert any("failed to load" in e for e in found["errors"]) and any("undefinedFunction" in e for e in found["errors"])

