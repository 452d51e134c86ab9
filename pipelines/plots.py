"""Offline DVC plots: one self-contained HTML page (vega inlined, no CDN) plus one PNG per plot.

`dvc plots show` writes a page that loads vega, vega-lite and vega-embed from a CDN, so it draws nothing
without a network. Here `dvc plots show --json` gives the Vega-Lite specs DVC would draw (data already
filled in), and the page is built around them with the JavaScript bundle of `vl-convert-python` inlined
(`vl_convert.javascript_bundle()`: a plain, import-free script that sets `window.vegaEmbed`, `window.vega`
and `window.vegaLite`). `screenshot` drives headless Chromium over the DevTools protocol (a pipe, no port)
to check such a page really draws, collecting console errors, uncaught exceptions and failed loads.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
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


def render_plots_page(repo: Path, out_html: Path, *, targets: Sequence[str] | None = None,
                      title: str = "DVC plots", png_scale: float = 2.0) -> Path:
    """Draw every plot of `repo`'s dvc.yaml (or only `targets`) into ONE self-contained, offline HTML page.

    The page inlines vega, vega-lite and vega-embed (no script src, no CDN) and gives each plot a heading
    with its name. Next to it, one PNG per plot, `<stem>_<i>.png` with i = 0, 1, ... in page order (for the
    README and MLflow); stale `<stem>_<i>.png` files from an earlier, longer run are removed. Returns
    `out_html`. Raises NoisyRolloutError when dvc fails or there are no plots.
    """
    import vl_convert

    specs = plot_specs(Path(repo), targets)
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
def find_chromium() -> str:
    """The Chromium executable on PATH; FileNotFoundError naming the package to install when there is none."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"chromium not found on PATH: install the `{CHROMIUM_PACKAGE}` package "
                            f"(Debian: apt-get install -y {CHROMIUM_PACKAGE})")


class _Cdp:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-framed)."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int, deadline: float):
        self.proc, self.deadline = proc, deadline
        self._out = os.fdopen(to_browser, "wb", buffering=0)
        self._messages: queue.Queue = queue.Queue()
        self._next_id = 0
        self.events: list[dict] = []
        threading.Thread(target=self._read, args=(from_browser,), daemon=True).start()

    def _read(self, fd: int) -> None:
        buf = b""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buf += chunk
                *frames, buf = buf.split(b"\0")
                for frame in frames:
                    if frame:
                        self._messages.put(json.loads(frame))
        self._messages.put(None)

    def _get(self) -> dict:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("chromium did not answer in time")
        try:
            msg = self._messages.get(timeout=left)
        except queue.Empty:
            raise TimeoutError("chromium did not answer in time") from None
        if msg is None:
            raise RuntimeError(f"chromium closed the DevTools pipe (exit code {self.proc.poll()})")
        return msg

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._out.write(json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._get()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"chromium {method}: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str | None = None, since: int = 0) -> dict:
        """The first `method` event of `session` among events recorded from index `since` on (waiting for it)."""
        for event in self.events[since:]:
            if event["method"] == method and event.get("sessionId") == session:
                return event
        while True:
            event = self._get()
            if "method" in event:
                self.events.append(event)
                if event["method"] == method and event.get("sessionId") == session:
                    return event

    def close(self) -> None:
        try:
            self._out.close()
        except OSError:
            pass


def _remote_object_text(obj: dict) -> str:
    if "value" in obj:
        return obj["value"] if isinstance(obj["value"], str) else json.dumps(obj["value"])
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "")


def _console_errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        params = event.get("params", {})
        if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console.error: " + " ".join(_remote_object_text(a) for a in params.get("args", [])))
        elif event["method"] == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception") or {}
            text = exc.get("description") or details.get("text", "exception")
            errors.append("uncaught: " + (text.splitlines()[0] if text else "exception"))
        elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source', 'log')}: {entry.get('text', '')}"
                          + (f" ({entry['url']})" if entry.get("url") else ""))
    return errors


# Resolves once the DOM has had no mutation for `quiet` ms (vega-embed draws asynchronously after load),
# or after `limit` ms; then waits two animation frames so the last layout is painted.
_SETTLE_JS = """new Promise(resolve => {
  const quiet = %d, limit = %d, start = performance.now();
  let last = performance.now();
  const obs = new MutationObserver(() => { last = performance.now(); });
  obs.observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
  (function check() {
    const now = performance.now();
    if (now - last >= quiet || now - start >= limit) {
      obs.disconnect();
      requestAnimationFrame(() => requestAnimationFrame(() => resolve(document.querySelectorAll("svg, canvas").length)));
    } else { setTimeout(check, 50); }
  })();
})"""


def screenshot(html_path: Path, png: Path, *, width: int = 1200, height: int = 900, timeout: float = 60,
               full_page: bool = False) -> list[str]:
    """Open `html_path` in headless Chromium with no network, save a PNG screenshot, return its console errors.

    Every host name resolves to nothing (`--host-resolver-rules=MAP * ~NOTFOUND`), so a page that needs a
    CDN fails to load it and says so. Errors returned, one line each: console.error/console.assert calls,
    uncaught exceptions, and browser log entries of level error (e.g. "Failed to load resource:
    net::ERR_NAME_NOT_RESOLVED"). The screenshot is taken once the DOM has been quiet for 300 ms after the
    load event (so asynchronous drawing such as vega-embed's has finished); `full_page` captures the whole
    page instead of the `width` x `height` viewport. Raises FileNotFoundError naming the package when
    Chromium is not on PATH, TimeoutError after `timeout` seconds.
    """
    chromium = find_chromium()
    html_path, png = Path(html_path).resolve(), Path(png)
    if not html_path.is_file():
        raise FileNotFoundError(f"no such page: {html_path}")
    deadline = time.monotonic() + timeout
    cmd_r, cmd_w = os.pipe()    # we write commands, chromium reads them on fd 3
    resp_r, resp_w = os.pipe()  # chromium writes replies and events on fd 4
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--metrics-recording-only", "--mute-audio",
                "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", f"--window-size={width},{height}",
                "about:blank"]
        # The shell moves our pipe ends onto fds 3/4, where --remote-debugging-pipe expects them.
        proc = subprocess.Popen(["/bin/sh", "-c", 'exec 3<&0 4>&1 0</dev/null 1>/dev/null; exec "$@"', "sh", *args],
                                stdin=cmd_r, stdout=resp_w, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(cmd_r)
        os.close(resp_w)
        cdp = _Cdp(proc, cmd_w, resp_r, deadline)
        try:
            target = cdp.send("Target.createTarget", {"url": "about:blank"})
            session = cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                cdp.send(f"{domain}.enable", session=session)
            cdp.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            since = len(cdp.events)
            nav = cdp.send("Page.navigate", {"url": html_path.as_uri()}, session=session)
            if nav.get("errorText"):
                raise RuntimeError(f"chromium could not open {html_path}: {nav['errorText']}")
            cdp.wait_event("Page.loadEventFired", session=session, since=since)
            settle_ms = max(1000, int((deadline - time.monotonic()) * 1000) - 2000)
            cdp.send("Runtime.evaluate", {"expression": _SETTLE_JS % (300, settle_ms), "awaitPromise": True},
                     session=session)
            shot: dict[str, Any] = {"format": "png"}
            if full_page:
                size = cdp.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                shot.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": max(width, size["width"]),
                                                               "height": size["height"], "scale": 1})
            data = cdp.send("Page.captureScreenshot", shot, session=session)["data"]
            png.parent.mkdir(parents=True, exist_ok=True)
            png.write_bytes(base64.b64decode(data))
            try:
                cdp.send("Browser.close")
            except (RuntimeError, TimeoutError):
                pass
            return _console_errors(cdp.events)
        finally:
            cdp.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # our own process group (start_new_session), chromium's helpers included
                proc.wait()
