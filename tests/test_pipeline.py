"""The resumable, incremental pipeline (handclip_nb/pipeline/steps.py).

The decisions (skip / resume / start over, which steps a change reaches, folder removal, links,
``force``, portable paths) are tested with a recording stand-in for ``run_notebook``: exact
and fast. A small real pipeline (stage 1 → stage 2 on tiny synthetic hands, run once per
module through papermill) checks the same contract end to end: a rerun skips both steps
without touching them, the executed notebooks hold no absolute path, and an interrupted
training step is resumed from its ``checkpoints/last.pt``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

import handclip_nb.pipeline.steps as pipeline
from handclip_nb.pipeline import Step, run_pipeline
from handclip_nb.runs import resolve_path

TINY = {"backbone": "tiny-vit", "num_splits": 2, "synthetic_subjects": 12,
        "synthetic_images": 3, "feature_cache": False}

STEPS = (
    Step("zs", "stage0_zeroshot.ipynb", None, dict(TINY)),
    Step("s1", "stage1_prompt.ipynb", None, {**TINY, "epochs": 2}),
    Step("s2", "stage2_image.ipynb", None, {**TINY, "epochs": 2, "p_ids": 4},
         links={"stage1_dir": "s1"}),
    Step("eval", "evaluation.ipynb", None, dict(TINY), links={"runs": ["zs", "s2"]}),
)


def _replace(steps, name, **changes):
    import dataclasses

    return tuple(dataclasses.replace(s, **changes) if s.name == name else s for s in steps)


class Recorder:
    """Stands in for ``run_notebook``: records each call and leaves a finished run folder."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[dict] = []
        self.fail = set(fail)

    def __call__(self, notebook, executed_path, parameters, progress=True, kernel="python3"):
        out = resolve_path(parameters["output_dir"])
        self.calls.append({"step": Path(executed_path).stem, "notebook": notebook,
                           "params": dict(parameters), "folder_existed": out.exists(),
                           "files_before": sorted(p.name for p in out.iterdir())
                           if out.exists() else []})
        if Path(executed_path).stem in self.fail:
            raise RuntimeError(f"simulated crash in {notebook}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text("{}")
        Path(executed_path).write_text("{}")
        return executed_path

    @property
    def steps(self) -> list[str]:
        return [c["step"] for c in self.calls]

    def call(self, step: str) -> dict:
        (found,) = [c for c in self.calls if c["step"] == step]
        return found


@pytest.fixture()
def recorder(monkeypatch, workbench_home):
    rec = Recorder()
    monkeypatch.setattr(pipeline, "run_notebook", rec)
    return rec


def _run(steps=STEPS, output="out", **kw) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_pipeline(output, steps, progress=False, **kw)
    return buf.getvalue()


def _state(home: Path, step: str, output="out") -> dict:
    return json.loads((home / output / ".pipeline" / f"{step}.json").read_text())


def _set_state(home: Path, step: str, **changes) -> None:
    path = home / "out" / ".pipeline" / f"{step}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------------------------------------
# Decisions, with the recording stand-in
# ------------------------------------------------------------------------------------------------


def test_first_run_runs_all_in_order_then_everything_is_skipped(recorder, workbench_home):
    _run()
    assert recorder.steps == ["zs", "s1", "s2", "eval"]
    for step in recorder.steps:
        assert _state(workbench_home, step)["status"] == "done"
    recorder.calls.clear()
    printed = _run()
    assert recorder.steps == []
    for step in ("zs", "s1", "s2", "eval"):
        assert f"[pipeline] {step}: up to date, skipped" in printed


def test_a_parameter_change_reruns_the_step_and_what_reads_it(recorder, workbench_home):
    _run()
    recorder.calls.clear()
    _run(_replace(STEPS, "s1", parameters={**TINY, "epochs": 3}))
    assert recorder.steps == ["s1", "s2", "eval"]  # zs reads nothing that changed
    recorder.calls.clear()
    _run(_replace(_replace(STEPS, "s1", parameters={**TINY, "epochs": 3}), "zs",
                  parameters={**TINY, "flip_tta": True}))
    assert recorder.steps == ["zs", "eval"]
    recorder.calls.clear()
    _run(_replace(STEPS, "eval", parameters={**TINY, "rerank": True}))  # back to s1 epochs 2
    assert recorder.steps == ["zs", "s1", "s2", "eval"]


def test_changed_inputs_remove_the_old_folder_before_rerunning(recorder, workbench_home):
    _run()
    marker = workbench_home / "out" / "s1" / "stale-marker"
    marker.write_text("from the earlier run")
    recorder.calls.clear()
    _run(_replace(STEPS, "s1", parameters={**TINY, "epochs": 5}))
    assert not marker.exists()
    for step in ("s1", "s2", "eval"):  # each started on an empty folder
        assert recorder.call(step)["folder_existed"] is False
        assert "resume" not in recorder.call(step)["params"]


def test_other_changes_reach_every_step(recorder, workbench_home, monkeypatch, tmp_path):
    _run()
    recorder.calls.clear()
    _run(extra={"seed": 1})
    assert recorder.steps == ["zs", "s1", "s2", "eval"]
    assert all(c["params"]["seed"] == 1 for c in recorder.calls)
    recorder.calls.clear()
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "another package version")
    _run(extra={"seed": 1})
    assert recorder.steps == ["zs", "s1", "s2", "eval"]
    # a params file's content is an input too
    params_dir = tmp_path / "params"
    params_dir.mkdir()
    (params_dir / "s1.yaml").write_text("epochs: 2\n")
    monkeypatch.setattr(pipeline, "PARAMS_DIR", params_dir)
    steps = _replace(STEPS, "s1", params_file="s1.yaml", parameters=dict(TINY))
    _run(steps)
    recorder.calls.clear()
    _run(steps)
    assert recorder.steps == []
    (params_dir / "s1.yaml").write_text("epochs: 4\n")
    _run(steps)
    assert recorder.steps == ["s1", "s2", "eval"]
    assert recorder.call("s1")["params"]["epochs"] == 4


def test_an_interrupted_step_is_resumed_and_keeps_its_folder(recorder, workbench_home):
    recorder.fail = {"s2"}
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run()
    assert recorder.steps == ["zs", "s1", "s2"]
    assert _state(workbench_home, "s2")["status"] == "running"
    assert not (workbench_home / "out" / ".pipeline" / "eval.json").exists()
    checkpoint = workbench_home / "out" / "s2" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"epoch 1 of 2")
    recorder.fail, recorder.calls = set(), []
    printed = _run()
    assert recorder.steps == ["s2", "eval"]
    assert recorder.call("s2")["params"]["resume"] is True
    assert recorder.call("s2")["folder_existed"] and checkpoint.exists()
    assert "resume" not in recorder.call("eval")["params"]
    assert "[pipeline] s2: resumed," in printed
    assert _state(workbench_home, "s2")["status"] == "done"


def test_resume_only_for_training_steps_and_only_with_unchanged_inputs(recorder,
                                                                       workbench_home):
    _run()
    # a zero-shot step left "running": re-run in place, but it takes no `resume` parameter
    _set_state(workbench_home, "zs", status="running")
    (workbench_home / "out" / "zs" / "metrics.json").unlink()
    recorder.calls.clear()
    _run()
    assert recorder.steps == ["zs"]
    assert "resume" not in recorder.call("zs")["params"]
    # "running" with other inputs: never resume a stale checkpoint
    _set_state(workbench_home, "s1", status="running")
    marker = workbench_home / "out" / "s1" / "checkpoints"
    marker.mkdir()
    recorder.calls.clear()
    _run(_replace(STEPS, "s1", parameters={**TINY, "epochs": 3}))
    assert recorder.steps == ["s1", "s2", "eval"]
    assert "resume" not in recorder.call("s1")["params"]
    assert not recorder.call("s1")["folder_existed"]


def test_missing_metrics_or_unreadable_state_reruns_from_scratch(recorder, workbench_home):
    _run()
    (workbench_home / "out" / "zs" / "metrics.json").unlink()  # "done" but not finished
    (workbench_home / "out" / ".pipeline" / "s1.json").write_text("{not json")
    recorder.calls.clear()
    _run()
    assert recorder.steps == ["zs", "s1"]  # s1's fingerprint is unchanged: s2 stays
    for step in ("zs", "s1"):
        assert not recorder.call(step)["folder_existed"]
        assert "resume" not in recorder.call(step)["params"]


def test_force_reruns_everything_from_scratch(recorder, workbench_home):
    _run()
    _set_state(workbench_home, "s1", status="running")
    recorder.calls.clear()
    _run(force=True)
    assert recorder.steps == ["zs", "s1", "s2", "eval"]
    assert not any(c["folder_existed"] or "resume" in c["params"] for c in recorder.calls)


@pytest.mark.parametrize("steps, missing", [
    ((STEPS[2], STEPS[1]), "['s1']"),  # read before it runs
    ((STEPS[0], STEPS[2]), "['s1']"),  # not in the pipeline at all
    ((STEPS[0], STEPS[1], STEPS[3]), "['s2']"),  # one entry of a list link
])
def test_a_link_to_a_step_that_does_not_run_before_it_is_refused(recorder, workbench_home,
                                                                  steps, missing):
    with pytest.raises(ValueError, match=re.escape(f"reads {missing}, which do not run before")):
        _run(steps)
    assert recorder.calls == []
    assert not (workbench_home / "out").exists()


def test_parameters_are_portable_under_the_project_root(recorder, workbench_home, monkeypatch,
                                                        tmp_path_factory):
    _run()
    s2 = recorder.call("s2")["params"]
    assert s2["output_dir"] == "out/s2" and s2["stage1_dir"] == "out/s1"
    assert recorder.call("eval")["params"]["runs"] == ["out/zs", "out/s2"]
    for call in recorder.calls:
        assert str(workbench_home) not in json.dumps(call["params"])
    # an output folder outside the project root stays absolute (the kernel runs in the root)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    recorder.calls.clear()
    _run(output=str(elsewhere))
    assert recorder.call("s2")["params"]["stage1_dir"] == str(elsewhere / "s1")
    assert (elsewhere / ".pipeline" / "s2.json").is_file()


def test_fingerprint_covers_notebook_parameters_upstream_and_code():
    step = STEPS[2]
    params = {"epochs": 2}
    base = pipeline.step_fingerprint(step, params, {"s1": "a"}, "code")
    assert base == pipeline.step_fingerprint(step, dict(params), {"s1": "a", "zs": "x"}, "code")
    assert base != pipeline.step_fingerprint(step, {"epochs": 3}, {"s1": "a"}, "code")
    assert base != pipeline.step_fingerprint(step, params, {"s1": "b"}, "code")
    assert base != pipeline.step_fingerprint(step, params, {"s1": "a"}, "other code")
    other_notebook = Step("s2", "stage3.ipynb", links={"stage1_dir": "s1"})
    assert base != pipeline.step_fingerprint(other_notebook, params, {"s1": "a"}, "code")
    assert pipeline.code_fingerprint() == pipeline.code_fingerprint()


# ------------------------------------------------------------------------------------------------
# End to end, through papermill (one module-scoped run: stage 1 → stage 2)
# ------------------------------------------------------------------------------------------------

REAL_STEPS = (
    Step("s1", "stage1_prompt.ipynb", None, {**TINY, "epochs": 2}),
    Step("s2", "stage2_image.ipynb", None,
         {**TINY, "epochs": 2, "p_ids": 4, "milestones": [10]}, links={"stage1_dir": "s1"}),
)


@pytest.fixture(scope="module")
def real_pipeline(tmp_path_factory):
    home = tmp_path_factory.mktemp("pipeline-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HANDCLIP_HOME", str(home))
        mp.setenv("OMP_NUM_THREADS", "1")  # the kernels inherit it
        printed = _run(REAL_STEPS)
        yield home, printed


def _mtimes(home: Path) -> dict[str, int]:
    out = home / "out"
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def _notebook_text(path: Path) -> tuple[str, str]:
    """(the injected parameters cell, every output's text) of an executed notebook."""
    nb = json.loads(path.read_text())
    injected = "".join(next(c["source"] for c in nb["cells"]
                            if "injected-parameters" in c["metadata"].get("tags", [])))
    outputs = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            outputs.append("".join(o.get("text", "")))
            outputs.append("".join(o.get("data", {}).get("text/plain", "")))
    return injected, "\n".join(outputs)


@pytest.mark.slow
@pytest.mark.notebook
def test_real_rerun_skips_finished_steps_without_touching_them(real_pipeline, monkeypatch):
    home, printed = real_pipeline
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    assert "[pipeline] s1:" in printed and "[pipeline] s2:" in printed
    assert (home / "out" / "s2" / "metrics.json").is_file()
    before = _mtimes(home)
    again = _run(REAL_STEPS)
    assert "[pipeline] s1: up to date, skipped" in again
    assert "[pipeline] s2: up to date, skipped" in again
    assert _mtimes(home) == before  # executed notebooks, run folders and states untouched
    # the executed notebooks name the folders relative to the project root
    for step, expected in (("s1", ['output_dir = "out/s1"']),
                           ("s2", ['output_dir = "out/s2"', 'stage1_dir = "out/s1"'])):
        injected, _ = _notebook_text(home / "out" / f"{step}.ipynb")
        assert str(home) not in injected and os.sep + "tmp" not in injected
        for line in expected:
            assert line in injected


@pytest.mark.slow
@pytest.mark.notebook
def test_real_interrupted_training_step_resumes_from_its_checkpoint(real_pipeline,
                                                                    monkeypatch):
    home, _ = real_pipeline
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    s2 = home / "out" / "s2"
    # what a kill after the last epoch's checkpoint but before metrics.json leaves behind
    (s2 / "metrics.json").unlink()
    _set_state(home, "s2", status="running")
    assert (s2 / "checkpoints" / "last.pt").is_file()
    s1_notebook = (home / "out" / "s1.ipynb").stat().st_mtime_ns
    printed = _run(REAL_STEPS)
    assert "[pipeline] s1: up to date, skipped" in printed
    assert "[pipeline] s2: resumed," in printed
    assert (home / "out" / "s1.ipynb").stat().st_mtime_ns == s1_notebook
    injected, outputs = _notebook_text(home / "out" / "s2.ipynb")
    assert "resume = True" in injected
    assert f"resuming stage2 from {s2 / 'checkpoints' / 'last.pt'} after epoch 2" in outputs
    metrics = json.loads((s2 / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert _state(home, "s2")["status"] == "done"


@pytest.mark.notebook
def test_a_notebooks_kernel_is_killed_after_its_last_cell_not_torn_down(tmp_path, monkeypatch):
    """run_notebook ends the kernel at once once its last cell is idle (steps.KERNEL_SHUTDOWN):
    a kernel that imported torch spends about 2 s of CPU tearing its interpreter down after a
    polite shutdown request, on every run of a grid. What the run keeps is complete when
    run_notebook returns (every output is in the executed notebook), and nothing registered
    for the interpreter's exit runs: this test's atexit handler writes no file."""
    marker = tmp_path / "teardown-ran.txt"
    name = _one_cell_notebook(tmp_path, (
        "import atexit, pathlib\n"
        "atexit.register(pathlib.Path(marker).write_text, 'the kernel ran its exit handlers')\n"
        "print('last cell done')"), name="exit.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", tmp_path / "notebooks")
    executed = pipeline.run_notebook(name, tmp_path / "executed.ipynb",
                                     {"marker": str(marker)}, progress=False)
    assert "last cell done" in executed.read_text()
    time.sleep(1.0)  # a kernel still exiting would write it now
    assert not marker.exists(), marker.read_text()


def _one_cell_notebook(folder: Path, code: str, name: str = "one.ipynb") -> str:
    """``folder/notebooks/<name>``: a parameters cell (``marker``) and one cell of ``code``."""
    import nbformat

    source = folder / "notebooks"
    source.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    parameters = nbformat.v4.new_code_cell('marker = ""')
    parameters.metadata["tags"] = ["parameters"]
    nb.cells = [parameters, nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, source / name)
    return name


#: A kernelspec whose launcher first lets another process take the kernel's shell port, the
#: race of two kernels started at once (jupyter_client chose the port free, then let go of
#: it): a child of the launcher binds the port from the connection file and holds it while
#: ipykernel starts. It can only take TCP ports; over Unix sockets in the run's own folder
#: there is nothing another process can take.
PORT_TAKER = """\
import json, os, socket, sys, time
info = json.load(open(sys.argv[sys.argv.index("-f") + 1]))
if info["transport"] == "tcp":
    taker = socket.socket()
    taker.bind((info["ip"], info["shell_port"]))
    taker.listen()
    if os.fork() == 0:  # the other process: holds the port past the kernel's start
        time.sleep(15)
        os._exit(0)
    taker.close()
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher"] + sys.argv[1:])
"""


@pytest.mark.notebook
def test_a_kernel_talks_over_sockets_of_its_own_that_no_other_process_can_take(
        tmp_path, monkeypatch):
    """run_notebook's kernel uses Unix sockets in a fresh 0700 folder (steps.KERNEL_TRANSPORT),
    removed after the run. Over TCP, a process that took the kernel's port between
    jupyter_client's choice and the kernel's bind killed the kernel before its first cell
    ("Address already in use"; one grid run of the test suite in nine failed so): here a
    launcher stages that race on every start, and the notebook still runs."""
    kernels = tmp_path / "jupyter" / "kernels" / "port-taker"
    kernels.mkdir(parents=True)
    (tmp_path / "port_taker.py").write_text(PORT_TAKER)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, str(tmp_path / "port_taker.py"), "-f", "{connection_file}"],
        "display_name": "port taker", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    name = _one_cell_notebook(tmp_path, (
        "import os, stat\n"
        "from ipykernel.kernelapp import IPKernelApp\n"
        "app = IPKernelApp.instance()\n"
        "folder = os.path.dirname(app.ip)\n"
        "print(app.transport, folder, oct(stat.S_IMODE(os.stat(folder).st_mode)))"))
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", tmp_path / "notebooks")
    executed = pipeline.run_notebook(name, tmp_path / "executed.ipynb", {}, progress=False,
                                     kernel="port-taker")
    printed = re.search(r"(\w+) (\S+) (0o\d+)", executed.read_text())
    assert printed, executed.read_text()[-2000:]
    transport, folder, mode = printed.groups()
    assert (transport, mode) == ("ipc", "0o700")
    assert not Path(folder).exists(), "the kernel's socket folder was left behind"


def test_kernel_sockets_leave_a_temp_folder_too_long_for_a_unix_socket(tmp_path, monkeypatch):
    """A Unix socket's path holds at most 107 bytes: a cluster's long $TMPDIR gives way to /tmp
    for the kernel's socket folder; a short one is used."""
    import tempfile

    short = Path(tempfile.mkdtemp(dir="/tmp"))  # tmp_path itself is long under xdist
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(short))
    try:
        folder = pipeline._kernel_socket_folder()
        assert folder.parent == short and oct(folder.stat().st_mode & 0o777) == "0o700"
    finally:
        shutil.rmtree(short)
    long = tmp_path / ("scratch-" * 12)
    long.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(long))
    folder = pipeline._kernel_socket_folder()
    try:
        assert folder.parent == Path("/tmp")
        assert len(str(folder / "kernel-5")) <= pipeline._SOCKET_PATH_MAX
    finally:
        folder.rmdir()
