"""A real browser: JupyterLab on localhost runs 01_quickstart.ipynb in headless Chromium, and the explorer renders.

Needs Debian's Chromium (``/usr/bin/chromium``, else ``chromium`` on the PATH, or ``PEELNB_CHROMIUM``)
and Playwright's Python package, which drives that installed binary (no browser download). Missing
either fails the test with how to install it. Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_quickstart.ipynb"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("PEELNB_CHROMIUM")
                or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium"))
                or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = ("install Chromium with `apt-get install -y chromium` (with sudo as a normal user) and the test "
           "extra with `pip install -e \".[test]\"` (Playwright's Python package and JupyterLab; Playwright "
           "drives the installed Chromium, no browser download)")
SERVER_START_S = 60
PAGE_S = 60
RUN_ALL_S = 120
SETTINGS = {
    # keep every cell in the page (the checks look for the explorer's elements)
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # no news or update pop-ups over the screenshot, no network calls
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}

CURRENT = "window.jupyterapp && window.jupyterapp.shell.currentWidget"
KERNEL_IDLE = f"""() => {{
    const panel = {CURRENT};
    const kernel = panel && panel.sessionContext && panel.sessionContext.session
        && panel.sessionContext.session.kernel;
    return Boolean(panel && panel.content && panel.content.model && kernel && kernel.status === "idle");
}}"""
RUN_ALL = """() => {
    window.__peelnbRunAll = undefined;
    window.jupyterapp.commands.execute("notebook:run-all-cells").then(
        (ok) => { window.__peelnbRunAll = ok === false ? "failed" : "done"; },
        (err) => { window.__peelnbRunAll = "error: " + err; });
}"""
CELLS = f"""() => {{
    const cells = {CURRENT}.content.model.cells;
    const out = [];
    for (let i = 0; i < cells.length; i++) {{
        const cell = cells.get(i);
        if (cell.type !== "code") continue;
        const errors = cell.outputs.toJSON().filter((o) => o.output_type === "error")
            .map((o) => o.ename + ": " + o.evalue);
        out.push({{count: cell.executionCount, errors}});
    }}
    return out;
}}"""


def _require_browser_stack() -> None:
    """Fail (never skip) with install instructions when a piece of the browser stack is missing."""
    if importlib.util.find_spec("playwright") is None:
        pytest.fail(f"the browser test needs Playwright's Python package, which is not installed: {INSTALL}",
                    pytrace=False)
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.fail(f"the browser test needs JupyterLab, which is not installed: {INSTALL}", pytrace=False)
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}, which is missing: {INSTALL} "
                    "(or point PEELNB_CHROMIUM at a Chromium binary)", pytrace=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_settings(folder: Path) -> None:
    for name, values in SETTINGS.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")


@contextlib.contextmanager
def _jupyter_lab(root: Path, log: Path) -> Iterator[str]:
    """JupyterLab serving ``root`` on a free localhost port, no token, its own config; yields its URL."""
    port = _free_port()
    private = root.parent / "jupyter"
    env = dict(os.environ, PEELNB_QUICK="1",
               JUPYTER_CONFIG_DIR=str(private / "config"), JUPYTER_DATA_DIR=str(private / "data"),
               JUPYTER_RUNTIME_DIR=str(private / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(private / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(private / "workspaces"))
    _write_settings(private / "settings")
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
               "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.port_retries=0", "--allow-root",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}",
                            pytrace=False)
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)


def test_quickstart_runs_in_jupyterlab_and_the_explorer_renders(tmp_path):
    _require_browser_stack()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    ARTIFACTS.mkdir(exist_ok=True)
    console: list[str] = []
    with _jupyter_lab(root, tmp_path / "jupyterlab.log") as url, sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        except PlaywrightError as err:
            pytest.fail(f"Playwright could not start {CHROMIUM}: {err}\n{INSTALL}", pytrace=False)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}") if msg.type == "error" else None)
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?reset", timeout=PAGE_S * 1000)
            page.wait_for_function(KERNEL_IDLE, timeout=PAGE_S * 1000, polling=250)
            page.evaluate(RUN_ALL)
            page.wait_for_function("() => window.__peelnbRunAll !== undefined", timeout=RUN_ALL_S * 1000,
                                   polling=250)
            outcome = page.evaluate("() => window.__peelnbRunAll")
            cells = page.evaluate(CELLS)
            page.screenshot(path=ARTIFACTS / "browser-lab.png")
            errors = [e for cell in cells for e in cell["errors"]]
            assert outcome == "done" and not errors, f"running {NOTEBOOK} failed: {outcome}; {errors}; {console[-5:]}"
            assert all(cell["count"] for cell in cells), f"cells left unexecuted: {[c['count'] for c in cells]}"

            explorer = page.locator(".jp-OutputArea-output .widget-vbox", has=page.locator(".widget-image")).first
            explorer.wait_for(state="visible", timeout=PAGE_S * 1000)
            explorer.scroll_into_view_if_needed()
            assert explorer.locator(".widget-dropdown select").count() >= 3, "the explorer's dropdowns are missing"
            assert explorer.locator(".widget-slider, .widget-hslider").count() >= 1, "no slider in the explorer"
            bits = explorer.locator('.widget-dropdown:has(label:text-is("bits")) select')
            shown = bits.evaluate("(select) => select.options[select.selectedIndex].text")
            assert shown.startswith("1.58"), f"the notebook set viewer.bits = 1.58; the bits control shows {shown!r}"
            images = explorer.locator("img")
            page.wait_for_function("(imgs) => imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 100)",
                                   arg=images.element_handles(), timeout=PAGE_S * 1000)
            assert images.count() >= 2, "the explorer's heatmap and layer panel images are missing"
            explorer.screenshot(path=ARTIFACTS / "explorer.png")
            page.screenshot(path=ARTIFACTS / "browser-explorer.png")
        finally:
            browser.close()
