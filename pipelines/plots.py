"""Offline DVC plots: one self-contained HTML page (vega inlined, no CDN) plus one PNG per plot.

`dvc plots show` writes a page that loads vega, vega-lite and vega-embed from a CDN, so it draws nothing
without a network. Here `dvc plots show --json` gives the Vega-Lite specs DVC would draw (data already
filled in), and the page is built around them with the JavaScript bundle of `vl-convert-python` inlined
(`vl_convert.javascript_bundle()`: a plain, import-free script that sets `window.vegaEmbed`, `window.vega`
and `window.vegaLite`). `screenshot` drives Debian's headless Chromium with Playwright to check such a page
really draws, collecting console errors, uncaught exceptions and failed loads.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from noisyrollout.errors import NoisyRolloutError

DVC_TIMEOUT_S = 180
CHROMIUM_PACKAGE = "chromium"  # Debian: apt-get install -y chromium


# --------------------------------------------------------------------------------------------- specs
def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plot_specs(repo: Path, targets: Sequence[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(plot name, Vega-Lite spec) for every plot `dvc plots show --json` gives in `repo`, in dvc.yaml order.

    Raises NoisyRolloutError when dvc fails, reports an error (a missing data file, a broken dvc.yaml),
    a requested target is missing, or there is no plot at all.
    """
    repo = Path(repo)
    if not (repo / ".dvc").is_dir():
        raise NoisyRolloutError(f"{repo} is not a DVC repository (no .dvc folder)")
    cmd = [sys.executable, "-m", "dvc", "plots", "show", "--json", *(targets or [])]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=DVC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NoisyRolloutError(f"dvc plots show timed out after {DVC_TIMEOUT_S} s in {repo}") from None
    if proc.returncode != 0:
        raise NoisyRolloutError(f"dvc plots show failed in {repo} (exit {proc.returncode}): "
                                + _one_line(proc.stderr or proc.stdout or "no output"))
    try:
        result = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        raise NoisyRolloutError(f"dvc plots show --json printed no JSON in {repo}: "
                                + _one_line(proc.stdout + " " + proc.stderr)) from None
    errors = result.get("errors") or []
    if errors:
        first = errors[0]
        where = first.get("name") or first.get("source") or first.get("rev") or "?"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise NoisyRolloutError(_one_line(f"dvc plots show in {repo}: {where}: {first.get('type', 'error')}: "
                                          f"{first.get('msg', '')}{more}"))
    data = {name: renders for name, renders in (result.get("data") or {}).items()}
    # With targets, a file that is also a declared plot comes twice: "dvc.yaml::<id>" (the declaration,
    # drawn as dvc.yaml says) and "<id>" (the raw file with the default template). Keep the declaration,
    # named as without targets.
    declared = {name.split("::", 1)[1] for name in data if "::" in name}
    specs: list[tuple[str, dict[str, Any]]] = []
    for name, renders in data.items():
        if "::" not in name and name in declared:
            continue
        if name.startswith("dvc.yaml::"):
            name = name.removeprefix("dvc.yaml::")
        for render in renders:
            if render.get("type") == "vega" and isinstance(render.get("content"), dict):
                specs.append((name, render["content"]))
    if targets:
        missing = [t for t in targets
                   if not any(n == t or n.endswith("::" + t) or n.startswith(t.rstrip("/") + "/")
                              for n, _ in specs)]
        if missing:
            raise NoisyRolloutError(f"no plot named {', '.join(missing)} in {repo} (dvc plots show found "
                                    f"{', '.join(n for n, _ in specs) or 'none'})")
    if not specs:
        raise NoisyRolloutError(f"no plots in {repo}: declare them under `plots:` in dvc.yaml")
    return specs


def _title(spec: dict[str, Any]) -> str:
    title = spec.get("title")
    if isinstance(title, dict):
        title = title.get("text")
    if isinstance(title, list):
        title = " ".join(map(str, title))
    return str(title) if title else ""


def _vl_version(specs: Sequence[dict[str, Any]]) -> str | None:
    """The newest Vega-Lite vl-convert ships with the major version the specs' $schema names (DVC: v5).

    A bundle of another major makes vega-embed warn on every chart; None (vl-convert's default) when the
    specs name no version or vl-convert has none of that major.
    """
    import vl_convert

    majors = {m.group(1) for s in specs
              if (m := re.search(r"vega-lite/v(\d+)", str(s.get("$schema", ""))))}
    if len(majors) != 1:
        return None
    major = majors.pop()
    versions = [v for v in vl_convert.get_vegalite_versions() if v.split(".")[0] == major]
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit())) if versions else None


@functools.lru_cache(maxsize=4)
def _bundle(vl_version: str | None) -> str:
    import vl_convert

    js = vl_convert.javascript_bundle(vl_version=vl_version)
    # A classic <script> ends at the first "</script" inside it whatever the JS says; the bundle has none.
    if re.search(r"</script", js, re.I):
        js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.I)
    return js


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element (no "</", no "<!--"; non-ASCII escaped)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="pipelines/plots.py (dvc plots show --json + vl-convert bundle)">
<title>{title}</title>
<style>
  body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 24px; color: #222; background: #fff; }}
  h1 {{ font-size: 20px; margin: 0 0 4px; }}
  p.meta {{ margin: 0 0 12px; color: #666; font-size: 13px; }}
  main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 8px 24px; }}
  section h2 {{ font-size: 15px; font-family: ui-monospace, monospace; margin: 8px 0 4px; }}
  .plot-error {{ color: #b00020; white-space: pre-wrap; }}
</style>
<script>
{bundle}
</script>
</head>
<body>
<h1>{title}</h1>
<p class="meta">{count} plot(s) from <code>dvc plots show --json</code>; drawn offline (Vega {vega_version}, Vega-Lite {vl_version}, vega-embed {embed_version} inlined).</p>
<noscript>This page draws its plots with JavaScript.</noscript>
<main>
{sections}
</main>
<script>
(function () {{
  const plots = {plots_json};
  const opts = {{ renderer: "svg", actions: {{ export: true, source: true, compiled: true, editor: false }} }};
  Promise.allSettled(plots.map(p => vegaEmbed("#" + p.id, p.spec, opts))).then(results => {{
    let drawn = 0;
    results.forEach((r, i) => {{
      if (r.status === "fulfilled") {{ drawn += 1; return; }}
      const msg = "plot " + plots[i].name + " failed to draw: " + (r.reason && r.reason.message || r.reason);
      console.error(msg);
      const el = document.getElementById(plots[i].id);
      el.className = "plot-error"; el.textContent = msg;
    }});
    document.documentElement.dataset.plotsDrawn = String(drawn);
  }});
}})();
</script>
</body>
</html>
"""


SMOOTHING = 0.2   # the initial loess bandwidth of DVC's line plots here (its slider starts at 0.001: the raw curve)
EXACT = {"alpha"}  # curves that are a schedule, not a noisy measurement: drawn as they are


def smoothed(spec: dict[str, Any], bandwidth: float = SMOOTHING) -> dict[str, Any]:
    """`spec` with the smoothing slider of DVC's line template (the `smooth` parameter: a loess line drawn over the
    faint raw one) starting at `bandwidth`, so the trend shows at a glance; other specs, and the curves in EXACT,
    unchanged."""
    fields = {t["loess"] for layer in spec.get("layer", []) for t in layer.get("transform", []) if "loess" in t}
    if not fields or fields <= EXACT:
        return spec
    params = [dict(p, value=bandwidth) if p.get("name") == "smooth" else p for p in spec.get("params", [])]
    return {**spec, "params": params}


def render_plots_page(repo: Path, out_html: Path, *, targets: Sequence[str] | None = None,
                      title: str = "DVC plots", png_scale: float = 2.0) -> Path:
    """Draw every plot of `repo`'s dvc.yaml (or only `targets`) into ONE self-contained, offline HTML page.

    The page inlines vega, vega-lite and vega-embed (no script src, no CDN) and gives each plot a heading
    with its name. Next to it, one PNG per plot, `<stem>_<i>.png` with i = 0, 1, ... in page order (for the
    README and MLflow); stale `<stem>_<i>.png` files from an earlier, longer run are removed. Returns
    `out_html`. Raises NoisyRolloutError when dvc fails or there are no plots.
    """
    import vl_convert

    specs = [(name, smoothed(spec)) for name, spec in plot_specs(Path(repo), targets)]
    vl_version = _vl_version([s for _, s in specs])
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)

    sections, plots = [], []
    for i, (name, spec) in enumerate(specs):
        div = f"plot-{i}"
        heading = html.escape(name)
        plot_title = _title(spec)
        tip = f' title="{html.escape(plot_title)}"' if plot_title else ""
        sections.append(f'<section aria-label="{heading}"><h2{tip}>{heading}</h2><div id="{div}"></div></section>')
        plots.append({"id": div, "name": name, "title": plot_title, "spec": spec})

    page = _PAGE.format(
        title=html.escape(title), count=len(specs), bundle=_bundle(vl_version),
        vega_version=html.escape(vl_convert.get_vega_version()), vl_version=html.escape(vl_version or "latest"),
        embed_version=html.escape(vl_convert.get_vega_embed_version()),
        sections="\n".join(sections), plots_json=_script_json(plots))
    tmp = out_html.with_name(out_html.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out_html)

    stale = re.compile(re.escape(out_html.stem) + r"_(\d+)\.png")
    for old in out_html.parent.glob(f"{out_html.stem}_*.png"):
        m = stale.fullmatch(old.name)
        if m and int(m.group(1)) >= len(specs):
            old.unlink()
    for i, (name, spec) in enumerate(specs):
        try:
            png = vl_convert.vegalite_to_png(spec, vl_version=vl_version, scale=png_scale)
        except Exception as exc:  # vl-convert raises ValueError with a multi-line JS trace
            raise NoisyRolloutError(_one_line(f"could not draw plot {name} as PNG: {exc}")) from None
        out_html.with_name(f"{out_html.stem}_{i}.png").write_bytes(png)
    return out_html


# ---------------------------------------------------------------------------------------- screenshot
class ChromiumNotFound(NoisyRolloutError, FileNotFoundError):
    """No Chromium on PATH. Both a NoisyRolloutError (one line for the CLI) and a FileNotFoundError."""


def find_chromium() -> str:
    """The Chromium executable on PATH; ChromiumNotFound naming the package to install when there is none."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise ChromiumNotFound(f"chromium not found on PATH: install the `{CHROMIUM_PACKAGE}` package "
                           f"(Debian: apt-get install -y {CHROMIUM_PACKAGE})")


# Debian's chromium, not a browser Playwright downloads (`playwright install` is never run). Playwright adds
# its own switches (--headless with headless=True, --no-sandbox, a fresh temporary --user-data-dir, ...); these
# are the ones this closed-network machine needs, repeated so they do not depend on Playwright's defaults.
# Every host name resolves to nothing, so a page that needs a CDN fails to load it and says so.
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND")

# Before any page script: the time of the last DOM mutation (or of the load event, whichever is later), so
# that "quiet for 300 ms after load" can be polled (vega-embed draws asynchronously after load).
_QUIET_INIT_JS = """(() => {
  window.__plotsQuietSince = performance.now();
  const touch = () => { window.__plotsQuietSince = performance.now(); };
  new MutationObserver(touch).observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
  window.addEventListener("load", touch);
})();"""
_QUIET_MS = 300
_TWO_FRAMES_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r())))"
_FAILED_LOAD = "Failed to load resource: net::"


def _errors(events: list[tuple[str, str, str]]) -> list[str]:
    """One line per error event, in order. Chromium also logs each failed request as a console error
    ("Failed to load resource: net::..."); that duplicate of a failed request is dropped."""
    failed = {url for kind, url, _ in events if kind == "failed request"}
    lines = []
    for kind, where, text in events:
        if kind == "failed request":
            lines.append(f"failed request: {where}: {text}")
        elif kind == "uncaught":
            lines.append(f"uncaught: {text}")
        elif not (text.startswith(_FAILED_LOAD) and where in failed):
            url = f" ({where})" if text.startswith("Failed to load") and where else ""
            lines.append(f"console.{kind}: {text}{url}")
    return lines


def screenshot(html_path: Path, png: Path, *, width: int = 1200, height: int = 900, timeout: float = 60,
               full_page: bool = False) -> list[str]:
    """Open `html_path` in headless Chromium with no network, save a PNG screenshot, return its console errors.

    Playwright drives Debian's chromium (`find_chromium`, as `executable_path`) with CHROMIUM_ARGS. Errors
    returned, one line each, in order: "console.error: ..." / "console.assert: ..." (console calls and
    errors the browser logs), "uncaught: <Error>: <message>" (uncaught exceptions and rejections) and
    "failed request: <url>: <reason>" (e.g. net::ERR_NAME_NOT_RESOLVED for a CDN). The screenshot is taken
    once the DOM has been quiet for 300 ms after the load event (so asynchronous drawing such as
    vega-embed's has finished), at most until shortly before `timeout`; `full_page` captures the whole page
    instead of the `width` x `height` viewport. Raises ChromiumNotFound (a NoisyRolloutError and a
    FileNotFoundError) naming the package when Chromium is not on PATH, TimeoutError after `timeout`
    seconds, RuntimeError when Chromium fails.
    """
    chromium = find_chromium()
    html_path, png = Path(html_path).resolve(), Path(png)
    if not html_path.is_file():
        raise FileNotFoundError(f"no such page: {html_path}")
    try:
        from playwright.sync_api import Error as PlaywrightError, TimeoutError as PlaywrightTimeout, sync_playwright
    except ImportError:
        raise NoisyRolloutError("playwright is not installed: pip install -c constraints.txt playwright") from None

    deadline = time.monotonic() + timeout

    def left_ms(reserve: float = 0.0) -> float:
        return max(1.0, (deadline - time.monotonic() - reserve) * 1000)

    events: list[tuple[str, str, str]] = []  # (console type | "uncaught" | "failed request", url, text)

    def on_console(msg) -> None:
        if msg.type in ("error", "assert"):
            events.append((msg.type, (msg.location or {}).get("url", ""), msg.text))

    def on_page_error(exc) -> None:
        events.append(("uncaught", "", f"{exc.name}: {exc.message}" if exc.name else exc.message))

    def on_request_failed(request) -> None:
        events.append(("failed request", request.url, request.failure or "failed"))

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=list(CHROMIUM_ARGS),
                                         timeout=left_ms())
            try:
                page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
                page.set_default_timeout(left_ms())
                page.on("console", on_console)
                page.on("pageerror", on_page_error)
                page.on("requestfailed", on_request_failed)
                page.add_init_script(_QUIET_INIT_JS)
                page.goto(html_path.as_uri(), wait_until="load", timeout=left_ms())
                try:  # not quiet in time (an animation): take the screenshot anyway, 2 s before the deadline
                    page.wait_for_function(f"() => performance.now() - window.__plotsQuietSince >= {_QUIET_MS}",
                                           polling=50, timeout=max(1000.0, left_ms(2.0)))
                except PlaywrightTimeout:
                    pass
                page.evaluate(_TWO_FRAMES_JS)  # so the last layout is painted
                data = page.screenshot(type="png", full_page=full_page, timeout=left_ms())
            finally:
                browser.close()
    except PlaywrightTimeout:
        raise TimeoutError(f"chromium did not render {html_path} within {timeout:g} s") from None
    except PlaywrightError as exc:
        raise RuntimeError(_one_line(f"chromium failed on {html_path}: {exc.message}")) from None
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(data)
    return _errors(events)
