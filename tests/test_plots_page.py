"""The offline DVC plots page: real dvc, real vl-convert, real headless Chromium driven by Playwright
(Debian's chromium, skipped when absent)."""

from __future__ import annotations

import os
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from noisyrollout.errors import NoisyRolloutError
from pipelines.plots import render_plots_page, screenshot

# The pipeline's plot declarations. eval.csv: `bar_horizontal_sorted` draws x as the quantitative axis and
# y as the category (sorted by -x), so the benchmark goes on y; with x: benchmark the bars come out empty.
DVC_YAML = """\
plots:
  - reports/plots/training.csv:
      x: step
      y: [reward_clean, reward_noisy]
      title: Training reward, clean vs noisy rollouts
  - alpha_t:
      x: step
      y: {reports/plots/training.csv: alpha}
      title: Distortion strength alpha_t
  - rollout_accuracy:
      x: step
      y: {reports/plots/training.csv: accuracy}
      title: Rollout accuracy per step
  - reports/plots/eval.csv:
      x: accuracy
      y: benchmark
      template: bar_horizontal_sorted
      title: Evaluation accuracy per benchmark
"""
PLOTS = {  # name -> title, in dvc.yaml order
    "reports/plots/training.csv": "Training reward, clean vs noisy rollouts",
    "alpha_t": "Distortion strength alpha_t",
    "rollout_accuracy": "Rollout accuracy per step",
    "reports/plots/eval.csv": "Evaluation accuracy per benchmark",
}
DVC_PURPLE = (0x94, 0x5D, 0xD6)  # DVC's colour for the workspace revision
NO_CHROMIUM = "chromium not installed (apt-get install chromium)"
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                                    reason=NO_CHROMIUM)


def _dvc(repo: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def _dvc_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    _dvc(path, "init", "-q")
    _dvc(path, "config", "core.analytics", "false")
    return path


def _write_data(repo: Path) -> None:
    plots = repo / "reports" / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = ["step,reward_clean,reward_noisy,accuracy,alpha"]
    for s in range(20):
        rows.append(f"{s},{0.30 + 0.020 * s:.3f},{0.25 + 0.015 * s:.3f},{0.40 + 0.010 * s:.3f},{0.5 * (1 - s / 19):.3f}")
    (plots / "training.csv").write_text("\n".join(rows) + "\n")
    (plots / "eval.csv").write_text("benchmark,accuracy\ngeo3k,0.52\nmathvista,0.61\nhallusion,0.44\n")


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> Path:
    repo = _dvc_repo(tmp_path_factory.mktemp("plots") / "repo")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _write_data(repo)
    return repo


@pytest.fixture(scope="module")
def page(plots_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "plots.html"
    assert render_plots_page(plots_repo, out) == out
    return out


def _share(img: Image.Image, colour: tuple[int, int, int], tol: int = 40) -> float:
    rgb = img.convert("RGB")
    pixels = list(rgb.getdata())
    near = sum(1 for p in pixels if all(abs(a - b) <= tol for a, b in zip(p, colour)))
    return near / len(pixels)


def test_page_is_self_contained_and_names_every_plot(page):
    text = page.read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in text and "unpkg.com" not in text
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I), "the page must inline its scripts"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']https?:", text, re.I)
    assert "window.vegaEmbed=" in text  # vl-convert's bundle, inlined
    for name, title in PLOTS.items():
        assert f">{name}</h2>" in text
        assert title in text
    # One PNG per plot next to the page, in dvc.yaml order; the sorted bar chart really has bars.
    pngs = [page.with_name(f"plots_{i}.png") for i in range(len(PLOTS))]
    assert all(p.is_file() for p in pngs) and not page.with_name(f"plots_{len(PLOTS)}.png").exists()
    for p in pngs:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 300
    with Image.open(pngs[3]) as bars:
        assert _share(bars, DVC_PURPLE) > 0.10, "eval bars are missing"


@needs_chromium
def test_page_draws_in_chromium_without_network(page, tmp_path):
    shot = tmp_path / "shot.png"
    errors = screenshot(page, shot, width=1200, height=900)
    assert errors == []
    with Image.open(shot) as img:
        assert img.size == (1200, 900)
        rgb = img.convert("RGB")
        pixels = list(rgb.getdata())
        non_white = sum(1 for p in pixels if min(p) < 235) / len(pixels)
        colours = {}
        for p in pixels:
            key = tuple(c // 32 for c in p)
            colours[key] = colours.get(key, 0) + 1
        common = [k for k, n in colours.items() if n / len(pixels) > 0.0005]
        purple = _share(rgb, DVC_PURPLE)
    assert non_white > 0.03, f"page looks blank ({non_white:.1%} non-white)"
    assert len(common) >= 4, f"only {len(common)} colours drawn"
    assert purple > 0.01, f"no chart marks drawn ({purple:.2%} purple)"

    # Control: the same browser set-up reports a page that needs the network.
    cdn = tmp_path / "cdn.html"
    cdn.write_text('<!DOCTYPE html><html><head><script src="https://cdn.jsdelivr.net/npm/vega@5"></script>'
                   '</head><body><div id="v"></div><script>vegaEmbed("#v", {})</script></body></html>')
    errors = screenshot(cdn, tmp_path / "cdn.png", width=400, height=300, timeout=30)
    assert any("ERR_NAME_NOT_RESOLVED" in e and "cdn.jsdelivr.net" in e for e in errors), errors
    assert any("vegaEmbed is not defined" in e for e in errors), errors


# A white page with one blue box and, in the erroneous variant, one error of each kind screenshot reports.
BOX = (20, 120, 200)
BOX_PAGE = """<!DOCTYPE html><html><body style="margin:0;background:#fff">
<div style="width:200px;height:120px;background:rgb(20,120,200)"></div>
<div style="height:1500px"></div>
<script>{script}</script></body></html>
"""
JS_ERRORS = ('console.error("plot", 3, "failed to draw");'
             'document.body.append(Object.assign(new Image(), {src: "missing.png"}));'
             'undefinedFunction();')


@needs_chromium
def test_screenshot_reports_js_errors(tmp_path):
    page = tmp_path / "errors.html"
    page.write_text(BOX_PAGE.format(script=JS_ERRORS))
    errors = screenshot(page, tmp_path / "errors.png", width=400, height=300, timeout=30)
    assert "console.error: plot 3 failed to draw" in errors, errors
    assert "uncaught: ReferenceError: undefinedFunction is not defined" in errors, errors
    assert any(e.startswith("failed request: ") and "missing.png" in e and "ERR_FILE_NOT_FOUND" in e
               for e in errors), errors
    assert len(errors) == 3, errors  # Chromium's own "Failed to load resource" line is not a second error
    assert all("\n" not in e for e in errors)
    with Image.open(tmp_path / "errors.png") as img:
        assert img.size == (400, 300)  # still a screenshot: errors are returned, not raised


@needs_chromium
def test_screenshot_of_a_correct_page_is_not_blank(tmp_path):
    page = tmp_path / "ok.html"
    page.write_text(BOX_PAGE.format(script='document.body.dataset.ok = "1";'))
    shot = tmp_path / "ok.png"
    assert screenshot(page, shot, width=400, height=300, timeout=30) == []
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (400, 300)
        box = _share(img, BOX, tol=10)
        white = _share(img, (255, 255, 255), tol=5)
    assert abs(box - 200 * 120 / (400 * 300)) < 0.01, f"the box is {box:.1%} of the screenshot, not 20%"
    assert white > 0.75, f"only {white:.1%} white"
    full = tmp_path / "full.png"
    assert screenshot(page, full, width=400, height=300, timeout=30, full_page=True) == []
    with Image.open(full) as img:
        assert img.width == 400 and img.height >= 120 + 1500


@needs_chromium
def test_screenshot_times_out_on_a_page_that_never_loads(tmp_path):
    page = tmp_path / "busy.html"
    page.write_text("<!DOCTYPE html><html><body><script>while (true) {}</script></body></html>")
    with pytest.raises(TimeoutError, match="within 3 s"):
        screenshot(page, tmp_path / "busy.png", timeout=3)
    assert not (tmp_path / "busy.png").exists()


def test_screenshot_names_the_package_when_chromium_is_missing(page, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="chromium"):
        screenshot(page, tmp_path / "x.png")
    with pytest.raises(NoisyRolloutError, match=r"apt-get install -y chromium\)$") as info:
        screenshot(page, tmp_path / "x.png")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_no_plots_is_an_error(tmp_path):
    repo = _dvc_repo(tmp_path / "empty")
    with pytest.raises(NoisyRolloutError, match="no plots") as info:
        render_plots_page(repo, tmp_path / "out" / "plots.html")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "plots.html").exists()


def test_dvc_errors_are_reported(tmp_path):
    repo = _dvc_repo(tmp_path / "broken")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _write_data(repo)
    (repo / "reports" / "plots" / "eval.csv").unlink()
    with pytest.raises(NoisyRolloutError, match="eval.csv") as info:
        render_plots_page(repo, tmp_path / "plots.html")
    assert "\n" not in str(info.value)
    with pytest.raises(NoisyRolloutError, match="no plot named nosuch"):
        render_plots_page(repo, tmp_path / "plots.html", targets=["nosuch"])
    with pytest.raises(NoisyRolloutError, match="not a DVC repository"):
        render_plots_page(tmp_path, tmp_path / "plots.html")


def test_training_curves_start_smoothed(plots_repo):
    """DVC's line template draws a loess line over the faint raw one, with a slider that starts at 0.001 (no
    smoothing); the page starts it at SMOOTHING, and leaves plots without the slider alone."""
    from pipelines.plots import SMOOTHING, plot_specs, smoothed

    specs = dict(plot_specs(plots_repo))
    line = specs[next(name for name in specs if "rollout_accuracy" in name)]
    assert [p["value"] for p in line["params"] if p["name"] == "smooth"] == [0.001]   # DVC's own start
    assert [p["value"] for p in smoothed(line)["params"] if p["name"] == "smooth"] == [SMOOTHING]
    assert any("loess" in t for layer in line["layer"] for t in layer.get("transform", []))
    bars = next(spec for spec in specs.values() if "smooth" not in json.dumps(spec.get("params", [])))
    assert smoothed(bars) == bars
    alpha = specs[next(name for name in specs if "alpha_t" in name)]
    assert smoothed(alpha) == alpha                  # a schedule: drawn as it is
