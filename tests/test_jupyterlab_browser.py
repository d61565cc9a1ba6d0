"""JupyterLab in a real (headless) browser, as a person uses it.

A smoke stage-3 run is trained in-process; a copy of ``notebooks/attention.ipynb`` with
``interactive=True`` and ``stage3_dir`` pointing at that run is opened in a private JupyterLab
server; Run > Run All Cells is clicked in the menu; the test waits for the kernel to finish and
checks that the ipywidgets explorer rendered with its heatmaps, then picks another query in the
explorer's dropdown and checks that the heatmaps are redrawn. Likewise ``notebooks/search.ipynb``
(zero-shot tiny-vit on a few synthetic hands, ``interactive=True``): its explorer's threshold
slider is dragged to either end and the decisions it lists must follow. Screenshots go to the
test's tmp folder (their paths are printed; ``pytest -rP`` or ``-s`` shows them).

Needs Debian's ``/usr/bin/chromium`` and the ``playwright`` Python package (its driver only:
``playwright install`` is never run, the system browser is used). Skipped without them, unless
``HANDCLIP_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which turns the skip into a failure.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_ENV = "HANDCLIP_REQUIRE_BROWSER"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
NOTEBOOK = "attention_browser.ipynb"
SERVER_START_S = 90   # a cold JupyterLab on a loaded 2-core machine
RUN_ALL_S = 120       # kernel start, torch import, model rebuild, figures, attention summary


def _require_browser():
    """Skip (or, with HANDCLIP_REQUIRE_BROWSER=1, fail) when chromium or playwright is absent."""
    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (Debian: apt-get install -y --no-install-recommends "
                       "chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -e '.[test]')")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{reason}; {REQUIRE_ENV} is set, so this may not be skipped")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the server's kernels), read from /proc."""
    try:
        out = []
        for t in Path(f"/proc/{pid}/task").iterdir():
            f = t / "children"
            if f.is_file():
                out += [int(c) for c in f.read_text().split()]
        return out
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not ours any more
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LabServer:
    def __init__(self, root: Path, port: int, token: str, proc: subprocess.Popen, log: Path):
        self.root, self.port, self.token, self.proc, self.log = root, port, token, proc, log
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0):
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"


def _shutdown(server: LabServer) -> None:
    """Ask the server to stop (it shuts its kernels down), then TERM, then KILL; any kernel the
    server started that is still alive afterwards is killed by its pid."""
    proc = server.proc
    kernels = set(_children(proc.pid))
    if proc.poll() is None:
        try:
            server.api("/api/shutdown", method="POST", timeout=5)
        except (OSError, urllib.error.URLError):
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(k) for k in kernels):
        time.sleep(0.2)
    for k in kernels:
        if _alive(k):
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture()
def lab_server(workbench_home, kernel_threads):
    """A private JupyterLab (own token, port, config, settings and workspaces) serving
    ``workbench_home/lab``; HANDCLIP_HOME points the kernel at ``workbench_home``, and under
    pytest -n N its kernels train on the worker's share of the cores (``kernel_threads``)."""
    root = workbench_home / "lab"
    private = workbench_home / "jupyter"
    settings = private / "settings"
    for d in (root, private / "config", private / "data", private / "runtime",
              private / "workspaces"):
        d.mkdir(parents=True, exist_ok=True)
    # No news / update toasts (they would ask for the network and cover the notebook).
    notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True, exist_ok=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    port, token = _free_port(), secrets.token_hex(24)
    env = {**os.environ, "HANDCLIP_HOME": str(workbench_home),
           "JUPYTER_CONFIG_DIR": str(private / "config"),
           "JUPYTER_DATA_DIR": str(private / "data"),
           "JUPYTER_RUNTIME_DIR": str(private / "runtime"),
           "JUPYTER_PLATFORM_DIRS": "1"}
    env.pop("MPLBACKEND", None)  # the kernel keeps its inline backend
    env.pop("JUPYTER_TOKEN", None)
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = ([str(jupyter)] if jupyter.is_file() else [sys.executable, "-m", "jupyter"]) + [
        "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={private / 'workspaces'}"]
    if os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    log = workbench_home / "jupyterlab.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = LabServer(root, port, token, proc, log)
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                server.api("/api/status", timeout=3)
                break
            except (OSError, urllib.error.URLError):
                if time.time() > deadline:
                    pytest.fail(f"jupyter lab did not answer within {SERVER_START_S} s:\n"
                                f"{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        _shutdown(server)


def _smoke_stage3_run(out: Path) -> Path:
    """A finished smoke stage-3 run (params.yaml, best.pt, metrics.json): PromptSG on tiny-vit
    for the smoke schedule (2 epochs) on 12 synthetic people, recorded as
    notebooks/stage3.ipynb records it."""
    from handclip_nb.data import build_protocol
    from handclip_nb.evaluate import metrics_record
    from handclip_nb.models import build_backbone
    from handclip_nb.params import load_params_file, resolve_params
    from handclip_nb.pipeline import NOTEBOOKS_DIR
    from handclip_nb.runs import finish_run, start_run
    from handclip_nb.attention import attention_summary
    from handclip_nb.train.stage3 import evaluate_stage3, train_stage3

    smoke = load_params_file(NOTEBOOKS_DIR.parent / "params" / "smoke.yaml")
    # tiny-vit: untrained, no weight file, fast; what matters here is the UI, not the model
    p = resolve_params({**smoke, "backbone": "tiny-vit", "synthetic_subjects": 12,
                        "device": "cpu", "output_dir": str(out)}, stage="stage3")
    run = start_run(p)
    protocol = build_protocol(p)
    backbone = build_backbone(p.backbone, image_size=p.image_size, seed=p.seed)
    s3 = train_stage3(p, run.output_dir, protocol, backbone, progress=False)
    results = evaluate_stage3(s3.model, protocol, p)
    attention = attention_summary(s3.model, protocol, p)
    finish_run(run, metrics_record(
        "stage3", p, protocol, results, backbone, trained_by="PromptSG training",
        attention=attention, history=s3.fit.history, val_history=s3.fit.val_history,
        best_epoch=s3.fit.best_epoch, warm_started_from=s3.warm_started_from,
        seconds_per_epoch=s3.fit.seconds_per_epoch))
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "metrics.json").is_file()
    return out


def _write_notebook(dest: Path, parameters: dict, source: str = "attention.ipynb") -> int:
    """``notebooks/<source>`` with papermill's injected-parameters cell, not executed;
    returns its number of cells."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from handclip_nb.pipeline import NOTEBOOKS_DIR

    nb = load_notebook_node(str(NOTEBOOKS_DIR / source))  # adds the tag lists
    nb = parameterize_notebook(nb, parameters, kernel_name="python3", language="python")
    nbformat.write(nb, dest)
    return len(nb.cells)


# JS run in the page: the state of the notebook's code cells.
_CELL_STATE = """() => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-CodeCell')];
  const prompts = cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
  const errors = [...document.querySelectorAll(
      '.jp-NotebookPanel .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(e => e.textContent).filter(t => /Error|Traceback/.test(t));
  return {prompts, errors};
}"""


@contextmanager
def _browser_page(server: LabServer, shots: Path):
    """A page of headless Chromium; on a failure a screenshot (``failure.png``) and the
    server log's tail are printed before the error goes on."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        page = None
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        except Exception:
            try:
                if page is not None:
                    page.screenshot(path=str(shots / "failure.png"))
                print(f"failure screenshot: {shots / 'failure.png'}")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            print(f"server log tail:\n{server.log_tail()}")
            raise
        finally:
            browser.close()


def _open_and_run_all(page, server: LabServer, notebook: str, cells: int, started: float,
                      shots: Path) -> None:
    """Open ``notebook`` in JupyterLab, wait for its kernel, click Run > Run All Cells as a
    person does, and wait until every cell ran without an error."""
    page.goto(f"{server.base}/lab/tree/{notebook}?token={server.token}&reset",
              wait_until="domcontentloaded")
    # ready when every cell is on the page and the status bar reads
    # "Python 3 (handclip) | Idle" (before that it says "No Kernel | Initializing", and
    # Run All would ask for a kernel)
    page.wait_for_function(
        """n => {
          const cells = document.querySelectorAll(
              '.jp-NotebookPanel .jp-Notebook .jp-Cell');
          const bar = document.querySelector('#jp-main-statusbar');
          const text = bar ? bar.innerText : '';
          return cells.length === n && /\\|\\s*Idle/.test(text) && !/No Kernel/.test(text);
        }""", arg=cells, timeout=90_000, polling=250)
    print(f"notebook open, kernel idle: {time.time() - started:.1f} s")

    # Run > Run All Cells, as a person does
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()

    page.wait_for_function(
        f"""() => {{
          const s = ({_CELL_STATE})();
          if (s.prompts.some(p => p.includes('*'))) return false;
          return /\\[\\d+\\]/.test(s.prompts[s.prompts.length - 1]) || s.errors.length > 0;
        }}""", timeout=RUN_ALL_S * 1000, polling=500)
    state = page.evaluate(_CELL_STATE)
    page.screenshot(path=str(shots / "run_all_done.png"))  # the last cell in view
    assert not state["errors"], "a cell failed:\n" + "\n".join(state["errors"])
    assert all(p.strip("[]: \u00a0").isdigit() for p in state["prompts"]), state["prompts"]
    print(f"all cells ran: {time.time() - started:.1f} s")


@pytest.mark.timeout(240)  # typically ~60 s; generous for a loaded 2-core machine
def test_attention_notebook_in_jupyterlab(workbench_home, request):
    _require_browser()
    started = time.time()
    s3 = _smoke_stage3_run(workbench_home / "outputs" / "s3")
    att = workbench_home / "outputs" / "att"
    shots = workbench_home / "screenshots"
    shots.mkdir()
    print(f"stage-3 smoke run: {time.time() - started:.1f} s")

    server = request.getfixturevalue("lab_server")  # after training: no idle server meanwhile
    print(f"jupyter lab up: {time.time() - started:.1f} s, log {server.log}")
    cells = _write_notebook(server.root / NOTEBOOK, {
        "interactive": True, "stage3_dir": str(s3), "output_dir": str(att),
        "backbone": "tiny-vit", "attention_queries": 2, "synthetic_subjects": 12,
        "synthetic_images": 4, "num_splits": 2, "device": "cpu"})

    with _browser_page(server, shots) as page:
        _open_and_run_all(page, server, NOTEBOOK, cells, started, shots)

        # the ipywidgets explorer: its controls and the heatmaps in its Output
        view = page.locator(".jp-OutputArea-output .jupyter-widgets.widget-vbox").first
        view.wait_for(state="attached")
        view.scroll_into_view_if_needed()
        query = view.locator(".widget-dropdown select").first
        assert view.locator(".widget-dropdown select").count() == 2  # query, head
        assert view.locator(".widget-slider").count() >= 1           # k
        assert view.locator(".widget-toggle-buttons button").count() == 2  # prompt modes
        heatmaps = view.locator(".widget-output img")
        page.wait_for_function(
            """el => { const imgs = el.querySelectorAll('.widget-output img');
                       return imgs.length >= 2 && [...imgs].every(
                           i => i.complete && i.naturalWidth > 100); }""",
            arg=view.element_handle(), timeout=30_000)
        first_src = heatmaps.first.get_attribute("src")
        broken = page.locator(".jp-NotebookPanel .jp-OutputArea-output",
                              has_text="Error displaying widget")
        assert broken.count() == 0, broken.all_inner_texts()
        page.wait_for_timeout(300)  # let the layout settle before the picture
        view.screenshot(path=str(shots / "explorer.png"))
        page.screenshot(path=str(shots / "jupyterlab.png"))

        # pick another query: the kernel redraws the heatmaps through the widget comm
        options = query.locator("option")
        assert options.count() >= 2
        query.select_option(index=1)
        page.wait_for_function(
            """([el, old]) => { const imgs = el.querySelectorAll('.widget-output img');
               return imgs.length >= 2 && imgs[0].getAttribute('src') !== old
                      && [...imgs].every(i => i.complete && i.naturalWidth > 100); }""",
            arg=[view.element_handle(), first_src], timeout=60_000)
        page.wait_for_timeout(300)
        view.screenshot(path=str(shots / "explorer_query1.png"))
        assert broken.count() == 0, broken.all_inner_texts()
        print(f"screenshots: {shots / 'jupyterlab.png'}, {shots / 'explorer.png'}, "
              f"{shots / 'explorer_query1.png'}")

    # the notebook ran to its end: the attention run is recorded and its PNGs are saved
    metrics = json.loads((att / "metrics.json").read_text())
    assert metrics["stage"] == "attention"
    assert (att / "figures" / "attention_query0.png").is_file()
    for name in ("jupyterlab.png", "explorer.png", "explorer_query1.png"):
        assert (shots / name).stat().st_size > 10_000, name
    print(f"browser test: {time.time() - started:.1f} s")


SEARCH_NOTEBOOK = "search_browser.ipynb"


def _search_folders(synthetic_11k: Path, root: Path, people: int = 4) -> tuple[Path, Path]:
    """``gallery/<person>/``: one dorsal_r photo of each of ``people`` people; ``queries/
    <person>/``: another photo of each (a labelled query folder)."""
    import shutil

    from handclip_nb.data.handinfo import read_handinfo

    records = [r for r in read_handinfo(synthetic_11k / "HandInfo.csv") if r.aspect == "dorsal_r"]
    gallery, queries = root / "gallery", root / "queries"
    for person in sorted({r.person for r in records})[:people]:
        mine = [r for r in records if r.person == person]
        for r, dest in zip(mine, (gallery, queries)):
            (dest / person).mkdir(parents=True, exist_ok=True)
            shutil.copy2(synthetic_11k / r.path, dest / person / Path(r.path).name)
    return gallery, queries


# JS run in the page: the search explorer's decisions, as the person reads them.
_DECISIONS = """el => {
  const box = el.querySelector('.handclip-search-decisions');
  if (!box) return null;
  const cells = [...box.querySelectorAll('tbody tr')].map(
      tr => [...tr.querySelectorAll('td')].map(td => td.textContent.trim()));
  const bold = box.querySelector('b');
  return {decision: bold ? bold.textContent : '', rows: cells};
}"""


@pytest.mark.timeout(240)  # typically ~40 s; generous for a loaded 2-core machine
def test_search_notebook_threshold_slider_in_jupyterlab(workbench_home, synthetic_11k,
                                                        request):
    """The search notebook's explorer in JupyterLab: the query's person is shown, and dragging
    the threshold slider to either end changes the decisions it shows (every image rejected
    and "not in gallery" at 0; every image accepted and "identified as" at the top)."""
    _require_browser()
    started = time.time()
    gallery, queries = _search_folders(synthetic_11k, workbench_home / "data")
    out = workbench_home / "outputs" / "search"
    shots = workbench_home / "screenshots"
    shots.mkdir()
    server = request.getfixturevalue("lab_server")
    print(f"jupyter lab up: {time.time() - started:.1f} s, log {server.log}")
    top_k = 3
    cells = _write_notebook(server.root / SEARCH_NOTEBOOK, {
        "interactive": True, "gallery_dir": str(gallery), "query": str(queries),
        "backbone": "tiny-vit", "top_k": top_k, "threshold": 0.5, "batch_size": 16,
        "num_workers": 0, "decode_cache": False, "device": "cpu", "output_dir": str(out)},
        source="search.ipynb")

    with _browser_page(server, shots) as page:
        _open_and_run_all(page, server, SEARCH_NOTEBOOK, cells, started, shots)
        view = page.locator(".jp-OutputArea-output .jupyter-widgets.widget-vbox",
                            has=page.locator(".handclip-search-decisions")).first
        view.wait_for(state="attached")
        view.scroll_into_view_if_needed()
        page.wait_for_function(f"""el => {{ const d = ({_DECISIONS})(el);
                                   const img = el.querySelector('.widget-output img');
                                   return d && d.rows.length === {top_k} && img
                                          && img.complete && img.naturalWidth > 100; }}""",
                               arg=view.element_handle(), timeout=30_000)
        before = view.evaluate(_DECISIONS)
        print(f"explorer shown: {time.time() - started:.1f} s; {before}")
        assert "query person" in view.locator(".handclip-search-decisions").inner_text()
        handle = view.locator(".widget-slider .noUi-handle").first
        track = view.locator(".widget-slider .noUi-base").first

        def drag_to(x_of_track):
            """Drag the slider's handle to ``x_of_track(track box)``, as a person does, and
            return the decisions once the kernel has redrawn them and the figure."""
            shown = view.evaluate(_DECISIONS)
            figure = view.locator(".widget-output img").first.get_attribute("src")
            h, t = handle.bounding_box(), track.bounding_box()
            y = h["y"] + h["height"] / 2
            page.mouse.move(h["x"] + h["width"] / 2, y)
            page.mouse.down()
            page.mouse.move(x_of_track(t), y, steps=8)
            page.mouse.up()
            page.wait_for_function(f"([el, old]) => {{ const d = ({_DECISIONS})(el); "
                                   f"return d && JSON.stringify(d) !== JSON.stringify(old); }}",
                                   arg=[view.element_handle(), shown], timeout=60_000)
            page.wait_for_function(
                """([el, old]) => { const img = el.querySelector('.widget-output img');
                   return img && img.getAttribute('src') !== old && img.complete
                          && img.naturalWidth > 100; }""",
                arg=[view.element_handle(), figure], timeout=60_000)
            page.wait_for_timeout(300)  # let the layout settle before the picture
            return view.evaluate(_DECISIONS)

        low = drag_to(lambda t: t["x"] - 40)  # past the left end: threshold 0
        view.screenshot(path=str(shots / "search_threshold_0.png"))
        high = drag_to(lambda t: t["x"] + t["width"] + 40)  # past the right end: the top
        view.screenshot(path=str(shots / "search_threshold_top.png"))
        print(f"slider moved: {time.time() - started:.1f} s")
        assert "Error displaying widget" not in page.inner_text(".jp-NotebookPanel")

    # columns: rank, gallery image, person, distance, threshold verdict, labels
    assert low["decision"] == "top-1 decision: not in gallery", low
    assert [row[4] for row in low["rows"]] == ["rejected"] * top_k, low
    assert high["decision"].startswith("top-1 decision: identified as "), high
    assert [row[4] for row in high["rows"]] == ["accepted"] * top_k, high
    assert [row[:4] for row in low["rows"]] == [row[:4] for row in high["rows"]]  # same ranking
    assert json.loads((out / "metrics.json").read_text())["stage"] == "search"
    print(f"browser test: {time.time() - started:.1f} s")
