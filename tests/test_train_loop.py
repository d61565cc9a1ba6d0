"""The shared loop: order of operations, per-epoch schedules, best-state copies, resume."""
import math

import pytest
import torch
from torch import nn

from handclip_nb.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from handclip_nb.train import TrainLoop
from handclip_nb.train.loop import LOSS_READ_EVERY
from handclip_nb.train.schedulers import (warmup_cosine, warmup_cosine_factor, warmup_multistep,
                                          warmup_multistep_factor)


def test_warmup_cosine_factor():
    f = [warmup_cosine_factor(e, epochs=20, warmup_epochs=5, start_factor=0.1, min_factor=0.0)
         for e in range(21)]
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:5], f[1:6]))  # linear warmup rises
    assert all(a >= b for a, b in zip(f[5:], f[6:]))  # cosine falls
    assert f[20] == pytest.approx(0.0, abs=1e-12)
    assert f[5 + 15 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_warmup_multistep_factor():
    f = [warmup_multistep_factor(e, [30, 50], 0.1, warmup_epochs=10) for e in range(60)]
    assert f[0] == pytest.approx(0.1) and f[10] == 1.0 and f[29] == 1.0
    assert f[30] == pytest.approx(0.1) and f[50] == pytest.approx(0.01)


def _toy(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(40, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return model, x, y


def _loop(tmp_path, model, x, y, epochs, grad_clip=None, validate=None, callbacks=(),
          scheduler="cosine", lr=0.05, meta=None, checkpoint_every=1, checkpoint_minutes=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = (warmup_cosine(opt, epochs, warmup_epochs=1) if scheduler == "cosine"
             else warmup_multistep(opt, [2], warmup_epochs=1))

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 8):
            idx = order[i:i + 8]
            yield x[idx] + 0.01 * torch.randn(len(idx), 4), y[idx]  # global-RNG noise

    def step(batch):
        xb, yb = batch
        loss = nn.functional.cross_entropy(model(xb), yb)
        return {"loss": loss, "ce": loss.detach()}

    return TrainLoop(stage="toy", output_dir=tmp_path, modules={"model": model}, optimizer=opt,
                     scheduler=sched, step=step, batches=batches, validate=validate,
                     grad_clip=grad_clip, meta=meta or {"arch": "toy"}, callbacks=callbacks,
                     progress=False, checkpoint_every=checkpoint_every,
                     checkpoint_minutes=checkpoint_minutes)


def test_loss_falls_and_scheduler_steps_once_per_epoch(tmp_path):
    model, x, y = _toy()
    loop = _loop(tmp_path, model, x, y, epochs=6)
    result = loop.fit(6)
    losses = [h["loss"]["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert loop.scheduler.last_epoch == 6  # 5 batches per epoch, but 6 scheduler steps
    lrs = [h["lr"] for h in result.history]
    assert lrs == pytest.approx([0.05 * warmup_cosine_factor(e, 6, 1) for e in range(6)])


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_is_clipped_before_the_optimizer_step(tmp_path):
    model, x, y = _toy()
    loop = _loop(tmp_path, model, 100 * x, y, epochs=1, grad_clip=0.5)
    norms = []
    original = loop.optimizer.step

    def spy(*a, **k):
        norms.append(torch.norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        return original(*a, **k)

    loop.optimizer.step = spy
    loop.fit(1)
    assert norms and max(norms) <= 0.5 + 1e-4


def test_best_state_is_a_copy_not_the_live_model(tmp_path):
    """docs/mistakes.md #3: the 'best' model was a reference to live modules, i.e. the last epoch."""
    model, x, y = _toy()
    scores = iter([10.0, 50.0, 20.0, 5.0])
    snapshots = []
    loop = _loop(tmp_path, model, x, y, epochs=4, validate=lambda: {"mAP": next(scores)},
                 callbacks=[lambda rec: snapshots.append(
                     {k: v.clone() for k, v in model.state_dict().items()})])
    result = loop.fit(4)
    assert result.best_epoch == 2 and result.best_score == 50.0
    for k, v in result.best_state["model"].items():
        assert torch.equal(v, snapshots[1][k])
    assert not torch.equal(result.best_state["model"]["0.weight"], model.state_dict()["0.weight"])
    saved = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert saved["epoch"] == 2
    assert torch.equal(saved["model"]["model"]["0.weight"], snapshots[1]["0.weight"])


def test_early_stopping(tmp_path):
    model, x, y = _toy()
    scores = iter([10.0, 30.0, 20.0, 20.0, 20.0, 20.0])
    loop = _loop(tmp_path, model, x, y, epochs=6, validate=lambda: {"mAP": next(scores)})
    loop.patience = 2
    result = loop.fit(6)
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2


class _Killed(Exception):
    pass


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    model_a, x, y = _toy()
    full = _loop(tmp_path / "a", model_a, x, y, epochs=5,
                 validate=lambda: {"mAP": float(-model_a[0].weight.sum())}).fit(5)

    torch.manual_seed(123)  # a crashed process leaves whatever RNG state it had
    model_b, _, _ = _toy()

    def kill(record):
        if record["epoch"] == 2:
            raise _Killed()

    with pytest.raises(_Killed):
        _loop(tmp_path / "b", model_b, x, y, epochs=5, callbacks=[kill],
              validate=lambda: {"mAP": float(-model_b[0].weight.sum())}).fit(5)

    torch.manual_seed(999)
    model_c, _, _ = _toy(seed=7)  # a fresh process, differently initialised: state comes back
    loop_c = _loop(tmp_path / "b", model_c, x, y, epochs=5,
                   validate=lambda: {"mAP": float(-model_c[0].weight.sum())})
    resumed = loop_c.fit(5, resume=True)
    assert resumed.resumed_from == 2
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_c.state_dict()[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert resumed.best_epoch == full.best_epoch


def test_corrupt_truncated_and_foreign_checkpoints(tmp_path):
    model, x, y = _toy()
    _loop(tmp_path, model, x, y, epochs=1).fit(1)
    last = tmp_path / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{last}.*corrupt or truncated"):
        load_checkpoint(last)
    last.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        _loop(tmp_path, model, x, y, epochs=2).fit(2, resume=True)
    torch.save({"something": 1}, last)
    with pytest.raises(CheckpointError, match="not a handclip_nb checkpoint"):
        load_checkpoint(last)


def test_resume_refuses_a_checkpoint_from_another_setup(tmp_path):
    model, x, y = _toy()
    _loop(tmp_path, model, x, y, epochs=1, meta={"backbone": "tiny-vit", "num_classes": 3}).fit(1)
    with pytest.raises(CheckpointError, match="num_classes: checkpoint has 3, this run has 5"):
        _loop(tmp_path, model, x, y, epochs=2,
              meta={"backbone": "tiny-vit", "num_classes": 5}).fit(2, resume=True)


def test_checkpoint_loads_with_weights_only(tmp_path):
    model, _, _ = _toy()
    p = save_checkpoint(tmp_path / "c.pt", stage="toy", epoch=3,
                        model={"m": model.state_dict()}, params={"seed": 1})
    ckpt = torch.load(p, weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["params"]["seed"] == 1


def test_amp_is_off_on_cpu(tmp_path):
    model, x, y = _toy()
    loop = _loop(tmp_path, model, x, y, epochs=1)
    loop2 = TrainLoop(stage="toy", output_dir=tmp_path, modules={"m": model},
                      optimizer=loop.optimizer, scheduler=None, step=loop.step,
                      batches=loop.batches, amp=True, device="cpu", progress=False)
    assert loop2.amp is False and not loop2.scaler.is_enabled()


def _scalars(log_dir):
    """{tag: [(step, value), ...]} of a TensorBoard folder, as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _named_groups_loop(tmp_path, epochs, callbacks=(), seed=0):
    """The toy loop with two named parameter groups (weights at lr, biases at 2 × lr); ``seed``
    initialises the model differently (a resumed run restores it), the data stays."""
    _, x, y = _toy()
    model, _, _ = _toy(seed)
    loop = _loop(tmp_path, model, x, y, epochs=epochs, callbacks=callbacks,
                 validate=lambda: {"mAP": float(-model[0].weight.sum()), "rank1": 50.0})
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    loop.optimizer = torch.optim.SGD([{"name": "weights", "params": weights, "lr": 0.05},
                                      {"name": "bias", "params": biases, "lr": 0.1}],
                                     momentum=0.9)
    loop.scheduler = warmup_cosine(loop.optimizer, epochs, warmup_epochs=1)
    return loop


def test_tensorboard_curves_are_written_per_epoch(tmp_path):
    loop = _named_groups_loop(tmp_path, epochs=3)
    result = loop.fit(3)
    scalars = _scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"loss/total", "loss/ce", "lr/weights", "lr/bias", "val/mAP",
                            "val/rank1", "time/seconds_per_epoch"}
    for tag, points in scalars.items():
        assert [s for s, _ in points] == [1, 2, 3], tag
    assert [v for _, v in scalars["loss/total"]] == pytest.approx(
        [h["loss"]["loss"] for h in result.history])
    assert [v for _, v in scalars["lr/weights"]] == pytest.approx([h["lr"] for h in result.history])
    assert [v for _, v in scalars["lr/bias"]] == pytest.approx(
        [2 * h["lr"] for h in result.history])
    assert [v for _, v in scalars["val/mAP"]] == pytest.approx(
        [h["val"]["mAP"] for h in result.history])
    # a fresh run in the same folder replaces the earlier run's curves
    _named_groups_loop(tmp_path, epochs=2).fit(2)
    assert [s for s, _ in _scalars(tmp_path / "tensorboard")["loss/total"]] == [1, 2]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_tensorboard_after_a_resume_has_each_epoch_once(tmp_path):
    full = _named_groups_loop(tmp_path / "a", epochs=4).fit(4)

    def kill(record):
        if record["epoch"] == 2:
            raise _Killed()

    with pytest.raises(_Killed):
        _named_groups_loop(tmp_path / "b", epochs=4, callbacks=[kill]).fit(4)
    resumed = _named_groups_loop(tmp_path / "b", epochs=4, seed=7).fit(4, resume=True)
    assert resumed.resumed_from == 2
    log_dir = tmp_path / "b" / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # one per process
    scalars = _scalars(log_dir)
    assert [s for s, _ in scalars["loss/total"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["val/rank1"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["loss/total"]] == pytest.approx(
        [h["loss"]["loss"] for h in full.history])
    assert [v for _, v in scalars["lr/bias"]] == pytest.approx(
        [v for _, v in _scalars(tmp_path / "a" / "tensorboard")["lr/bias"]])


def test_tensorboard_can_be_switched_off(tmp_path):
    model, x, y = _toy()
    loop = _loop(tmp_path, model, x, y, epochs=1)
    loop.tensorboard = False
    loop.fit(1)
    assert not (tmp_path / "tensorboard").exists()
    assert TrainLoop.__init__.__kwdefaults__["tensorboard"] is True


#: The Tensor methods that copy a value to the host: on CUDA each one waits for the device.
_HOST_READS = ("item", "tolist", "__float__", "__int__", "__index__", "__bool__", "cpu", "numpy")


def _counting_host_reads(monkeypatch) -> dict:
    """Count every call of :data:`_HOST_READS` made from Python (the loop's, the optimiser's)."""
    counts = {"reads": 0}
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def _steps_loop(tmp_path, steps_per_epoch, read_every=LOSS_READ_EVERY, nan_at=None,
                losses=None):
    """One linear model trained on ``steps_per_epoch`` fixed batches per epoch; three loss parts
    (as the stages return). ``nan_at=(epoch, step)`` (1-based) makes that step's loss NaN;
    ``losses`` collects each step's parts (detached clones)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epoch_of = {"epoch": 0}

    def batches(epoch):
        epoch_of["epoch"] = epoch + 1
        for _ in range(steps_per_epoch):
            yield x, y

    step_of = {"step": 0}

    def step(batch):
        step_of["step"] += 1
        logits = model(batch[0])
        ce = nn.functional.cross_entropy(logits, batch[1])
        reg = 1e-3 * logits.pow(2).mean()
        total = ce + reg
        if nan_at == (epoch_of["epoch"], (step_of["step"] - 1) % steps_per_epoch + 1):
            total = total * float("nan")
        parts = {"loss": total, "ce": ce.detach(), "reg": reg.detach()}
        if losses is not None:
            losses.append({k: v.detach().clone() for k, v in parts.items()})
        return parts

    return TrainLoop(stage="toy", output_dir=tmp_path, modules={"model": model}, optimizer=opt,
                     scheduler=None, step=step, batches=batches, meta={"arch": "lin"},
                     progress=False, tensorboard=False, read_every=read_every,
                     checkpoint_every=1)


def _host_reads(tmp_path, monkeypatch, steps_per_epoch, read_every=LOSS_READ_EVERY):
    loop = _steps_loop(tmp_path / f"s{steps_per_epoch}-r{read_every}", steps_per_epoch,
                       read_every)
    with monkeypatch.context() as patch:
        counts = _counting_host_reads(patch)
        loop.fit(1)
    return counts["reads"]


def test_the_loop_never_waits_on_the_device_inside_an_epoch(tmp_path, monkeypatch):
    """No host read per training step: an epoch of 16 steps reads the device as often as one of
    4 (the epoch's single read of the loss sums, the checkpoint's copies); with ``read_every=4``
    exactly one more read per 4 steps (the progress bar's running loss). The per-step reads of
    the old loop (``if not isfinite(loss)``, ``float(part)`` per part: 4 here) fail it."""
    short, long_ = _host_reads(tmp_path, monkeypatch, 4), _host_reads(tmp_path, monkeypatch, 16)
    per_step = (long_ - short) / 12
    assert per_step == 0, f"{per_step} host reads per training step (4 steps: {short}, 16: {long_})"
    every4 = [_host_reads(tmp_path, monkeypatch, n, read_every=4) for n in (4, 16)]
    assert every4[1] - every4[0] == 3  # steps 8, 12 and 16 of 16 each read once more


def test_the_epoch_losses_are_the_python_float_means_of_the_steps(tmp_path):
    """The device-side sums record what per-step ``float(part)`` reads added up, bit for bit."""
    losses = []
    result = _steps_loop(tmp_path, 7, read_every=3, losses=losses).fit(2)
    for epoch, record in enumerate(result.history):
        steps = losses[7 * epoch:7 * (epoch + 1)]
        for name in ("loss", "ce", "reg"):
            total = 0.0
            for parts in steps:
                total = total + float(parts[name])
            assert record["loss"][name] == total / 7  # exact: same additions, same order


@pytest.mark.parametrize("read_every, where", [(4, "steps 5 and 8"), (50, "steps 1 and 10"),
                                               (1, "step 7")])
def test_a_non_finite_loss_stops_the_run_naming_its_steps(tmp_path, read_every, where):
    """The NaN of epoch 2, step 7 is found at the next read; nothing of epoch 2 is saved."""
    loop = _steps_loop(tmp_path, 10, read_every=read_every, nan_at=(2, 7))
    with pytest.raises(FloatingPointError,
                       match=f"toy epoch 2: a non-finite loss between {where} "
                             r"\(non-finite parts: loss[a-z, ]*\); lower lr"):
        loop.fit(3)
    saved = load_checkpoint(loop.last_path, stage="toy")
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    assert all(torch.isfinite(v).all() for v in saved["model"]["model"].values())
    assert not loop.best_path.exists()


def test_read_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="read_every must be a number of steps >= 1, got 0"):
        _steps_loop(tmp_path, 2, read_every=0)


@pytest.mark.parametrize("later, kept", [(False, 1), (True, 3)])
def test_a_tie_keeps_the_first_epoch_unless_ties_keep_later(tmp_path, later, kept):
    """CLIP-HandID keeps the later of two epochs with the same val accuracy (train_handID.py:180
    `epoch_acc >= best_acc`); the workbench's AP selection keeps the first."""
    model, x, y = _toy()
    loop = _loop(tmp_path, model, x, y, epochs=3, validate=lambda: {"mAP": 50.0})
    loop.ties_keep_later = later
    fit = loop.fit(3)
    assert fit.best_epoch == kept and fit.best_score == 50.0
