"""Checkpoints at a cost the run chooses: what last.pt and best.pt hold, when last.pt is written,
the checkpoint a stop signal asks for (and the exact resume from it), format-1 files, and the
streamed atomic save."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn

import handclip_nb.checkpoint as checkpoint_module
import handclip_nb.train.loop as loop_module
from handclip_nb.checkpoint import CheckpointError, load_checkpoint
from handclip_nb.params import SCHEMA, run_identity
from handclip_nb.runs import atomic_torch_save
from handclip_nb.train import TrainLoop

REPO = Path(__file__).resolve().parents[1]


def _frozen_and_head(seed: int = 0):
    """A frozen 'encoder' (the role of CLIP's text tower) beside a trained head."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32)).requires_grad_(False).eval()
    head = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    return encoder, head


def _toy_loop(out, encoder, head, *, steps=4, **kw):
    x = torch.randn(8 * steps, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(len(x)) % 3
    # every parameter handed to Adam, the frozen ones too: only those with gradients get state
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-2)

    def batches(epoch):
        for i in range(0, len(x), 8):
            yield x[i:i + 8], y[i:i + 8]

    def step(batch):
        with torch.no_grad():
            feats = encoder(batch[0])
        return {"loss": nn.functional.cross_entropy(head(feats), batch[1])}

    kw.setdefault("checkpoint_every", 1)
    return TrainLoop(stage="toy", output_dir=out, modules={"head": head}, optimizer=opt,
                     scheduler=None, step=step, batches=batches,
                     validate=lambda: {"mAP": float(-head[0].weight.sum())},
                     meta={"arch": "toy"}, frozen={"encoder": encoder}, progress=False,
                     tensorboard=False, **kw)


# ------------------------------------------------------------------------------------------------
# (a) what last.pt and best.pt hold
# ------------------------------------------------------------------------------------------------


def test_last_holds_only_the_trained_state_and_best_no_optimizer_state(tmp_path):
    encoder, head = _frozen_and_head()
    loop = _toy_loop(tmp_path, encoder, head)
    loop.fit(2)
    last = load_checkpoint(loop.last_path, stage="toy")
    assert set(last["model"]) == {"head"}  # the frozen encoder is not copied ...
    frozen = last["meta"]["frozen"]  # ... but named by the SHA-256 of its tensors
    assert frozen["tensors"] == len(encoder.state_dict()) == 7  # Linear 2, BatchNorm 2 + 3 buffers
    assert frozen["sha256"] == checkpoint_module.frozen_sha256(
        {f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    trained = [p for p in head.parameters()]
    state = last["optimizer"]["state"]
    assert len(state) == len(trained)  # Adam moments of the trained parameters only
    assert sum(v["exp_avg"].numel() for v in state.values()) == sum(p.numel() for p in trained)
    best = load_checkpoint(loop.best_path, stage="toy")
    assert best["kind"] == "best" and best["format"] == checkpoint_module.FORMAT
    assert best["optimizer"] is None and best["scheduler"] is None and best["rng"] is None
    assert set(best["model"]) == {"head"}
    # the kept state alone is much smaller than the resume point (Adam's two moments)
    assert loop.best_path.stat().st_size < 0.75 * loop.last_path.stat().st_size


def test_frozen_tensors_leave_out_the_modules_that_train():
    """A stage-2 run's frozen 'clip' minus its trained 'visual' submodule."""
    clip = nn.ModuleDict({"visual": nn.Linear(2, 2), "text": nn.Linear(3, 3)})
    tensors = checkpoint_module.frozen_tensors({"clip": clip}, {"visual": clip["visual"]})
    assert sorted(tensors) == ["clip.text.bias", "clip.text.weight"]
    assert checkpoint_module.frozen_tensors({"clip": clip}, {"all": clip}) == {}


def test_resume_refuses_other_frozen_weights_naming_the_file(tmp_path):
    encoder, head = _frozen_and_head()
    _toy_loop(tmp_path, encoder, head).fit(1)
    encoder2, head2 = _frozen_and_head(seed=5)  # other frozen weights (another weights file)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'checkpoints' / 'last.pt'} was "
                                              f"trained beside other frozen weights"):
        _toy_loop(tmp_path, encoder2, head2).fit(2, resume=True)
    encoder3, head3 = _frozen_and_head(seed=0)  # the same ones: resumes
    assert _toy_loop(tmp_path, encoder3, head3).fit(2, resume=True).resumed_from == 1


# ------------------------------------------------------------------------------------------------
# (b) when last.pt is written
# ------------------------------------------------------------------------------------------------


def _count_writes(monkeypatch) -> list[tuple[str, int, int]]:
    """(file name, epoch, step) of every checkpoint that reaches the disk."""
    written = []
    original = checkpoint_module.atomic_torch_save

    def counting(obj, path):
        written.append((Path(path).name, obj["epoch"], obj["step"]))
        return original(obj, path)

    monkeypatch.setattr(checkpoint_module, "atomic_torch_save", counting)
    return written


@pytest.mark.parametrize("every, expected", [(1, [1, 2, 3, 4, 5, 6, 7]), (3, [3, 6, 7]),
                                             (0, [7])])
def test_checkpoint_every_sets_the_epochs_last_pt_is_written(tmp_path, monkeypatch, every,
                                                             expected):
    """Every N epochs, and always after the last one; best.pt on each validation gain only."""
    written = _count_writes(monkeypatch)
    encoder, head = _frozen_and_head()
    _toy_loop(tmp_path, encoder, head, checkpoint_every=every, checkpoint_minutes=0).fit(7)
    assert [e for name, e, _ in written if name == "last.pt"] == expected
    assert all(step == 0 for name, _, step in written)


def test_early_stop_writes_last_pt(tmp_path, monkeypatch):
    written = _count_writes(monkeypatch)
    encoder, head = _frozen_and_head()
    loop = _toy_loop(tmp_path, encoder, head, checkpoint_every=0, checkpoint_minutes=0,
                     patience=1)
    loop.validate = lambda: {"mAP": 1.0}  # never better than epoch 1: stops after epoch 2
    fit = loop.fit(7)
    assert fit.stopped_early and [e for n, e, _ in written if n == "last.pt"] == [2]


def test_checkpoint_minutes_writes_after_the_step_the_time_passed(tmp_path, monkeypatch):
    """Each step takes a minute (a fake clock): with checkpoint_minutes=2.5 the step after which
    2.5 minutes passed since the last write writes a mid-epoch last.pt (epoch = completed
    epochs, step = steps done in the running one); the end of training writes one too."""
    now = {"t": 0.0}
    monkeypatch.setattr(loop_module, "_now", lambda: now["t"])
    written = _count_writes(monkeypatch)
    encoder, head = _frozen_and_head()
    loop = _toy_loop(tmp_path, encoder, head, steps=4, checkpoint_every=0,
                     checkpoint_minutes=2.5)
    step = loop.step

    def a_minute(batch):
        now["t"] += 60.0
        return step(batch)

    loop.step = a_minute
    loop.fit(2)
    assert [(e, s) for n, e, s in written if n == "last.pt"] == [(0, 3), (1, 2), (2, 0)]


def test_checkpoint_settings_are_training_parameters_outside_the_run_identity():
    for name in ("checkpoint_every", "checkpoint_minutes"):
        assert set(SCHEMA[name].stages) == {"pretrain", "stage1", "stage2", "stage3", "handid"}
    from handclip_nb.params import resolve_params

    base = resolve_params({}, stage="stage2")
    other = resolve_params({"checkpoint_every": 2, "checkpoint_minutes": 5}, stage="stage2")
    assert run_identity(base) == run_identity(other)  # same run, same numbers
    with pytest.raises(ValueError, match="checkpoint_every"):
        resolve_params({"checkpoint_every": -1}, stage="stage2")


# ------------------------------------------------------------------------------------------------
# (c) a stop signal mid-epoch: last.pt at the step, then an exact resume
# ------------------------------------------------------------------------------------------------

#: A run of 3 epochs of 6 steps whose batches (a permutation and noise) and steps (dropout) all
#: draw from the global RNG. argv: output dir, the (epoch, step) after which it pauses (json,
#: or null) until the file "go" appears, resume (0/1). Prints the final result as json.
TOY_RUN = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from handclip_nb.train.loop import TrainLoop, TrainingStopped
    from handclip_nb.train.schedulers import warmup_cosine

    out, pause, resume = Path(sys.argv[1]), json.loads(sys.argv[2]), bool(int(sys.argv[3]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    where = {"epoch": 0, "step": 0}

    def batches(epoch):
        where["epoch"], where["step"] = epoch + 1, 0
        order = torch.randperm(len(x))
        for i in range(0, len(x), 8):
            idx = order[i:i + 8]
            yield x[idx] + 0.05 * torch.randn(len(idx), 4), y[idx]

    def step(batch):
        where["step"] += 1
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        if pause and [where["epoch"], where["step"]] == pause:
            print("PAUSED", flush=True)
            deadline = time.time() + 60
            while not (out / "go").exists() and time.time() < deadline:
                time.sleep(0.02)
        return {"loss": loss}

    loop = TrainLoop(stage="toy", output_dir=out, modules={"model": model}, optimizer=opt,
                     scheduler=warmup_cosine(opt, 3, warmup_epochs=1), step=step,
                     batches=batches, validate=lambda: {"mAP": float(-model[0].weight.sum())},
                     meta={"arch": "toy"}, progress=False, tensorboard=False,
                     checkpoint_every=0, checkpoint_minutes=0)
    try:
        fit = loop.fit(3, resume=resume)
    except TrainingStopped as exc:
        print("STOPPED", exc.signal_name, exc.epoch, exc.step, flush=True)
        sys.exit(3)
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in fit.history]
    weights = {k: v.tolist() for k, v in model.state_dict().items()}
    print("RESULT " + json.dumps({"history": history, "weights": weights,
                                  "best_epoch": fit.best_epoch}), flush=True)
""")


def _toy_run(out: Path, pause=None, resume=False, signum=None):
    """Run TOY_RUN; with ``signum``, this process plays the grid job's: when the run pauses it
    passes the signal on with ``forward_stop_signal`` (in a thread: it waits for the
    checkpoint), then lets the run go on. Returns (exit code, output, what the job saw)."""
    from handclip_nb.pipeline.kernel_stop import forward_stop_signal

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", TOY_RUN, str(out), json.dumps(pause),
                             str(int(resume))], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines, seen, job = [], [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "PAUSED" and signum is not None:
                job = threading.Thread(target=lambda: seen.append(forward_stop_signal(
                    signum, out / "checkpoints" / "last.pt", timeout=60, kernels=[proc.pid])))
                job.start()
                time.sleep(0.2)  # the handler runs in the sleeping child at once
                (out / "go").touch()
        proc.wait(timeout=120)
        if job is not None:
            job.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines), "".join(seen)


def _result(text: str) -> dict:
    return json.loads(next(l for l in text.splitlines() if l.startswith("RESULT "))[7:])


def _uninterrupted(tmp_path, monkeypatch, capsys) -> dict:
    """TOY_RUN in this process (one thread, as the children): the reference result."""
    monkeypatch.setattr(sys, "argv", ["toy", str(tmp_path / "whole"), "null", "0"])
    threads = torch.get_num_threads()
    try:
        exec(compile(TOY_RUN, "TOY_RUN", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)
    return _result(capsys.readouterr().out)


@pytest.mark.slow
def test_a_signal_mid_epoch_writes_last_pt_and_the_resumed_run_ends_as_an_uninterrupted_one(
        tmp_path, monkeypatch, capsys):
    """SIGUSR2 (submitit's) after step 4 of epoch 2; the resumed run is stopped again by SIGTERM
    after step 2 of epoch 3; the run resumed from there ends bit for bit as one never stopped.
    The signals go through ``forward_stop_signal``, which returns once last.pt is written."""
    whole = _uninterrupted(tmp_path, monkeypatch, capsys)
    out = tmp_path / "stopped"
    last = out / "checkpoints" / "last.pt"
    for signum, (epoch, step), resume in ((signal.SIGUSR2, (2, 4), False),
                                          (signal.SIGTERM, (3, 2), True)):
        (out / "go").unlink(missing_ok=True)
        code, text, job = _toy_run(out, pause=[epoch, step], resume=resume, signum=signum)
        name = signal.Signals(signum).name
        assert job.startswith(f"{name} passed to 1 process(es); {last} written"), job
        assert code == 3 and f"STOPPED {name} {epoch - 1} {step}" in text, text
        assert f"toy stopped by {name} in epoch {epoch} after step {step}: {last} written" in text
        saved = load_checkpoint(last, stage="toy")
        assert (saved["epoch"], saved["step"], saved["partial"]["batches"]) == \
            (epoch - 1, step, step)
    code, text, _ = _toy_run(out, resume=True)
    assert code == 0, text
    assert f"resuming toy from {last} in epoch 3 after step 2" in text
    assert _result(text) == whole  # same losses, validation, best epoch and weights, bit for bit


def test_child_processes_lists_the_kernels_a_job_started():
    from handclip_nb.pipeline.kernel_stop import child_processes, forward_stop_signal

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in child_processes()
        # a child that is not training ends on SIGTERM: the job stops waiting at once
        started = time.time()
        seen = forward_stop_signal(signal.SIGTERM, Path("/nonexistent/last.pt"), timeout=20,
                                   kernels=[child.pid])
        assert seen == "SIGTERM passed to 1 process(es); they ended without a checkpoint"
        assert time.time() - started < 10
    finally:
        child.kill()
        child.wait()


def test_a_job_passes_the_signal_to_its_kernel_before_its_own_handler_runs(tmp_path):
    """What ``steps.execute_spec`` wraps the notebook's execution in: the signal goes to the
    kernel (here a sleeping child, which ends on it), then to the handler that was there
    (submitit's requeue in a Slurm job); afterwards that handler is back."""
    from handclip_nb.pipeline.kernel_stop import stop_signals_forwarded

    called = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: called.append(signum))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with stop_signals_forwarded(tmp_path / "last.pt", timeout=20):
            os.kill(os.getpid(), signal.SIGUSR2)
            child.wait(timeout=20)  # the kernel got it
            assert called == [signal.SIGUSR2]  # ... and then the job's own handler
        assert child.returncode == -signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGUSR2)
        assert called == [signal.SIGUSR2] * 2  # restored
    finally:
        signal.signal(signal.SIGUSR2, before)
        if child.poll() is None:
            child.kill()
            child.wait()


def test_the_stop_handlers_are_restored_after_fit(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    encoder, head = _frozen_and_head()
    _toy_loop(tmp_path, encoder, head).fit(1)
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------------------------------------------
# (d) a last.pt of format 1
# ------------------------------------------------------------------------------------------------


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint as the workbench wrote it before format 2."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("kind", "step", "partial"):
        ckpt.pop(key)
    ckpt["meta"].pop("frozen", None)
    ckpt["format"] = "handclip_nb.checkpoint/1"
    torch.save(ckpt, path)


def test_a_format_1_last_pt_resumes_with_a_message(tmp_path, capsys):
    encoder, head = _frozen_and_head()
    whole = _toy_loop(tmp_path / "whole", encoder, head).fit(4)
    encoder, head = _frozen_and_head()

    class Killed(Exception):
        pass

    def kill(record):
        if record["epoch"] == 2:
            raise Killed()

    out = tmp_path / "old"
    with pytest.raises(Killed):
        _toy_loop(out, encoder, head, callbacks=[kill]).fit(4)
    last = out / "checkpoints" / "last.pt"
    _as_format_1(last)
    _as_format_1(out / "checkpoints" / "best.pt")
    capsys.readouterr()
    encoder, head = _frozen_and_head()
    resumed = _toy_loop(out, encoder, head).fit(4, resume=True)
    printed = capsys.readouterr().out
    assert (f"{last} is a checkpoint of an earlier workbench (handclip_nb.checkpoint/1): "
            f"resuming from it after epoch 2") in printed
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    assert load_checkpoint(last)["format"] == checkpoint_module.FORMAT  # rewritten in format 2


def test_a_best_pt_in_place_of_last_pt_is_refused_naming_the_file(tmp_path):
    encoder, head = _frozen_and_head()
    loop = _toy_loop(tmp_path, encoder, head)
    loop.fit(1)
    loop.best_path.replace(loop.last_path)
    with pytest.raises(CheckpointError, match=f"{loop.last_path} holds no optimizer state.*"
                                              f"delete it to start over"):
        _toy_loop(tmp_path, *_frozen_and_head()).fit(2, resume=True)


# ------------------------------------------------------------------------------------------------
# (e) the streamed atomic save
# ------------------------------------------------------------------------------------------------


def test_a_save_that_fails_midway_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_torch_save({"x": torch.arange(10)}, path)
    before = path.read_bytes()
    # a large tensor is streamed first, then pickling fails on a lambda
    with pytest.raises(Exception):
        atomic_torch_save({"a": torch.zeros(1_000_000), "b": lambda: None}, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["last.pt"]


def test_the_save_streams_to_disk_without_an_in_memory_copy(tmp_path):
    """Python-heap allocations during the save of a 32 MB tensor stay far below its size (the
    former save built the whole file in a BytesIO, then copied it: twice the size)."""
    tensor = torch.ones(8_000_000)  # 32 MB in torch's allocator, which tracemalloc does not see
    tracemalloc.start()
    try:
        atomic_torch_save({"t": tensor}, tmp_path / "big.pt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "big.pt").stat().st_size > 32e6
    assert peak < 4e6, f"{peak / 1e6:.1f} MB held in memory while saving 32 MB"
