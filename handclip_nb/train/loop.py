"""The shared training loop of every stage: one place for the order of operations.

Per batch: ``zero_grad`` → forward (under the run's :class:`~handclip_nb.device.Precision`:
fp32, fp16 autocast, or bf16 autocast; mixed precision on CUDA only unless a caller passes a
CPU precision explicitly, as the tests do) → ``backward`` (scaled for fp16) → unscale + clip the
gradient norm → ``optimizer.step()`` (docs/mistakes.md #8: clipping after ``step`` did nothing).
Per epoch: ``scheduler.step()`` once → validation every ``eval_every`` epochs on the
model-selection split (training identities only, docs/mistakes.md #1) → the best state is *copied*
(cloned tensors, docs/mistakes.md #3) and saved as ``best.pt`` (no optimiser state: readers load
it, resuming never does).

When ``last.pt`` is written (the resume point: the trained modules, optimiser, scheduler, scaler,
RNG, history; never the frozen weights, which ``meta["frozen"]`` names by SHA-256 and a resume
checks): every ``checkpoint_every`` epochs, after any step once ``checkpoint_minutes`` passed
since the last write, at the end of training (last epoch or early stop), and when the process
receives a stop signal (:data:`STOP_SIGNALS`: SIGUSR2, submitit's pre-emption and time-limit
signal, and SIGTERM). A signal is only recorded by its handler; the loop finishes the step it is
in, writes a mid-epoch ``last.pt`` and raises :class:`TrainingStopped`. ``resume=True`` then
continues at that step: it rebuilds the epoch's batches from the RNG state of the epoch's start,
skips the ones already trained on, restores the RNG of the stop and carries the epoch's loss sums
on, so the resumed run ends with the numbers of one that was never stopped. The handlers are
installed by ``fit`` in the main thread (a notebook kernel runs cells there), so the kernel that
trains must receive the signal itself: Slurm delivers a job's signals to every process of the
job step (the papermill kernel included; ``pipeline/kernel_stop.py`` makes the grid job pass it
on and wait for the checkpoint); the previous handlers are restored when ``fit`` returns. The
data loader's worker processes are forked inside ``fit`` and inherit the handlers, so a signal
sent to every process of the job does not end them before the step in progress finishes.

A stage supplies three callables (torchreid's engine design: only ``forward_backward`` differs
between stages): ``batches(epoch)`` yields batches, ``step(batch)`` returns a dict of loss tensors
with the total under ``"loss"``, and ``validate()`` returns a dict of metrics (percent).

The loop never waits on the device inside an epoch: each step's loss parts are added to
device-side float64 sums (no ``float(loss)``, no ``if isfinite``), read in one transfer every
``read_every`` steps (the progress bar's running loss) and at the end of the epoch. A
non-finite loss is found at that read and stops the run naming the steps it happened between;
the weights may have taken that step (a fp16 run's gradient scaler skips it, a fp32 run's weights
turn NaN), but the read comes before anything is saved, so ``last.pt`` and ``best.pt`` still
hold the previous epoch. The float64 sums add the same values in the same order as the Python
floats of the per-step reads did, so the recorded epoch losses are bit-identical.

Every epoch's record is also written as TensorBoard scalars to ``<output_dir>/tensorboard/``
(:class:`TensorBoardWriter`, on by default: ``tensorboard=False`` turns it off), the epoch as
the step, so ``tensorboard --logdir DIR`` compares every run under ``DIR`` (a whole grid).
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from ..device import Precision, run_precision
from ..progress import tqdm
from ..runs import BEST_CHECKPOINT, LAST_CHECKPOINT
from ..checkpoint import (FORMAT, CheckpointError, check_frozen, check_meta, frozen_sha256,
                          frozen_tensors, load_checkpoint, restore_rng_state, rng_state,
                          save_checkpoint)
from ..params import SCHEMA

__all__ = ["TrainLoop", "FitResult", "clone_state", "compiled", "run_precision",
           "TensorBoardWriter", "TENSORBOARD_DIR", "LOSS_READ_EVERY", "STOP_SIGNALS",
           "TrainingStopped"]

#: Signals after which ``fit`` finishes its step, writes ``last.pt`` and stops: submitit's
#: pre-emption/time-limit signal (Slurm sends it ``slurm_signal_delay_s`` before the limit) and
#: the polite kill of Slurm (``scancel``, requeue; SIGKILL follows after KillWait, 30 s by
#: default) and of the local executor.
STOP_SIGNALS = ("SIGUSR2", "SIGTERM")

#: The run folder's TensorBoard event files (one file per process that trained the run).
TENSORBOARD_DIR = "tensorboard"

#: Steps between two reads of the running loss sums (the progress bar's loss, the non-finite
#: check); each read waits for the device once, so the queue of launched kernels drains at most
#: once per this many steps.
LOSS_READ_EVERY = 50


def clone_state(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """A detached CPU copy of every module's state: later training cannot change it."""
    return {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            for name, m in modules.items()}


def compiled(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(module)`` when ``enabled`` (the ``compile`` parameter), else ``module``.
    The compiled wrapper shares the module's parameters, so optimisers, checkpoints and
    evaluation keep using the module itself."""
    return torch.compile(module) if enabled else module


class TensorBoardWriter:
    """A :class:`TrainLoop` callback: each epoch's record as TensorBoard scalars in
    ``log_dir``, with the epoch (1-based) as the step:

    * ``loss/total`` and ``loss/<part>``: the record's mean losses (``loss`` is the total);
    * ``lr/<group>``: the learning rate of every optimiser parameter group during the epoch
      (the group's ``name``, else its index; without ``lr_groups`` the record's ``lr`` as
      ``lr/0``);
    * ``val/<metric>``: the validation metrics of the epochs that were validated;
    * ``time/seconds_per_epoch``.

    ``purge_step``: the first step this writer writes; TensorBoard hides events of earlier
    writers at this step and after, so a resumed run shows each epoch once. Events are flushed
    every epoch, so an interrupted run keeps the epochs its ``last.pt`` holds."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self.purge_step = purge_step
        self._writer: SummaryWriter | None = None

    def _open(self) -> SummaryWriter:
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            _after_existing_event_files(self.log_dir)
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def __call__(self, record: Mapping[str, Any],
                 lr_groups: Mapping[str, float] | None = None) -> None:
        writer = self._open()
        step = int(record["epoch"])
        for part, value in record.get("loss", {}).items():
            writer.add_scalar("loss/total" if part == "loss" else f"loss/{part}", value, step)
        groups = lr_groups if lr_groups is not None else (
            {"0": record["lr"]} if "lr" in record else {})
        for group, value in groups.items():
            writer.add_scalar(f"lr/{group}", value, step)
        for metric, value in record.get("val", {}).items():
            writer.add_scalar(f"val/{metric}", value, step)
        if "seconds" in record:
            writer.add_scalar("time/seconds_per_epoch", record["seconds"], step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


def _after_existing_event_files(log_dir: Path) -> None:
    """Wait (at most a second) until the clock is past every event file's timestamp: TensorBoard
    reads a folder's event files in name order, which is their creation second, and a resumed
    run's file must come after the interrupted run's for ``purge_step`` to apply."""
    stamps = [int(p.name.split(".")[3]) for p in _event_files(log_dir)
              if p.name.split(".")[3].isdigit()]
    if stamps and max(stamps) >= int(time.time()):
        time.sleep(max(stamps) + 1 - time.time())


def _lr_groups(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{group name or index: lr}`` of every parameter group."""
    return {str(group.get("name") or i): float(group["lr"])
            for i, group in enumerate(optimizer.param_groups)}


class TrainingStopped(RuntimeError):
    """``fit`` stopped on a signal after writing ``last.pt``; ``resume=True`` continues there."""

    def __init__(self, message: str, signal_name: str, epoch: int, step: int):
        super().__init__(message)
        self.signal_name, self.epoch, self.step = signal_name, epoch, step


class _StopSignals:
    """While entered (in the main thread), :data:`STOP_SIGNALS` only set ``received``; the
    handlers that were there before come back on exit. Outside the main thread Python cannot
    install handlers and nothing is changed (``installed`` is False)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signum = getattr(signal, name, None)  # Windows has no SIGUSR2
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


@dataclass
class _CheckpointClock:
    """When ``last.pt`` is due besides the end of training and a stop signal."""

    every: int  # epochs; 0 = not by epoch count
    minutes: float  # since the last write; 0 = not by time
    last_write: float = field(default_factory=lambda: _now())

    def epoch_due(self, completed: int) -> bool:
        return bool(self.every) and completed % self.every == 0

    def time_due(self) -> bool:
        return bool(self.minutes) and _now() - self.last_write >= 60.0 * self.minutes

    def written(self) -> None:
        self.last_write = _now()


def _now() -> float:
    """Seconds on a clock that only moves forward (the checkpoint clock's; tests replace it)."""
    return time.monotonic()


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int | None
    best_score: float | None
    best_state: dict | None
    epochs_run: int
    stopped_early: bool
    resumed_from: int | None = None
    seconds_per_epoch: float = 0.0
    extra: dict = field(default_factory=dict)
    best_metric: str = "mAP"  # what best_score measures (the loop's select_metric)

    def describe(self) -> str:
        """One line: which epoch the run kept and why, and the time per epoch."""
        if self.best_score is not None:
            kept = f"best epoch {self.best_epoch} (val {self.best_metric} {self.best_score:.2f})"
        elif self.history:
            kept = f"kept the last epoch ({self.history[-1]['epoch']})"
        else:
            kept = "no epoch trained"
        selection = self.extra.get("selection")
        if selection:
            kept += (f"; epochs chosen on held-out training identities: best epoch "
                     f"{selection['best_epoch']} (val {selection.get('metric', 'mAP')} "
                     f"{selection['best_score']:.2f})")
        return f"{kept}; {self.seconds_per_epoch:.2f} s per epoch"

    @property
    def val_history(self) -> list[dict]:
        """``[{"epoch": e, "rank1": .., "mAP": .., ...}]`` for the epochs that were validated."""
        return [{"epoch": h["epoch"], **h["val"]} for h in self.history if "val" in h]


class TrainLoop:
    def __init__(self, *, stage: str, output_dir: str | Path, modules: Mapping[str, nn.Module],
                 optimizer: torch.optim.Optimizer, scheduler, step: Callable[[Any], dict],
                 batches: Callable[[int], Iterable], validate: Callable[[], dict] | None = None,
                 select_metric: str = "mAP", eval_every: int = 1, patience: int | None = None,
                 ties_keep_later: bool = False,
                 grad_clip: float | None = None, device: torch.device | str = "cpu",
                 amp: bool = False, precision: Precision | None = None,
                 params: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None,
                 callbacks: Iterable[Callable[[dict], None]] = (), progress: bool = True,
                 tensorboard: bool = True, read_every: int = LOSS_READ_EVERY,
                 checkpoint_every: int = SCHEMA["checkpoint_every"].default,
                 checkpoint_minutes: float = SCHEMA["checkpoint_minutes"].default,
                 frozen: Mapping[str, nn.Module] | None = None):
        if int(read_every) < 1:
            raise ValueError(f"read_every must be a number of steps >= 1, got {read_every!r}")
        if int(checkpoint_every) < 0 or float(checkpoint_minutes) < 0:
            raise ValueError(f"checkpoint_every (epochs) and checkpoint_minutes must be >= 0 "
                             f"(0 = off), got {checkpoint_every!r} and {checkpoint_minutes!r}")
        self.stage = stage
        self.output_dir = Path(output_dir)
        self.ckpt_dir = self.output_dir / Path(LAST_CHECKPOINT).parent
        self.modules = dict(modules)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.step, self.batches, self.validate = step, batches, validate
        self.select_metric, self.eval_every, self.patience = select_metric, eval_every, patience
        # a validated epoch that equals the best so far replaces it (CLIP-HandID's `>=`,
        # train_handID.py) instead of the first one staying
        self.ties_keep_later = bool(ties_keep_later)
        self.grad_clip = grad_clip
        self.device = torch.device(device)
        # ``amp`` alone means fp16 on CUDA; CPU trains in fp32 unless ``precision`` says
        # otherwise (docs/methods.md). Weights stay fp32 either way (autocast casts per op).
        self.precision = precision or Precision(self.device.type,
                                                enabled=bool(amp) and self.device.type == "cuda")
        self.amp = self.precision.enabled
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.needs_scaler)
        self.params = dict(params or {})
        self.meta = dict(meta or {})
        self.callbacks = list(callbacks)
        self.progress = progress
        self.tensorboard = tensorboard  # write <output_dir>/tensorboard/ (TensorBoardWriter)
        self.read_every = int(read_every)  # steps between two reads of the loss sums
        self.checkpoint_every, self.checkpoint_minutes = int(checkpoint_every), \
            float(checkpoint_minutes)
        # modules the run trains beside but never changes (a CLIP's text tower): named in
        # meta["frozen"] by SHA-256, not copied into any checkpoint
        self.frozen = dict(frozen or {})
        #: every checkpoint this loop wrote: {"kind", "epoch", "step", "reason", "bytes",
        #: "seconds"} (the benchmark's and the tests' record)
        self.writes: list[dict] = []

    @property
    def last_path(self) -> Path:
        return self.output_dir / LAST_CHECKPOINT

    @property
    def best_path(self) -> Path:
        return self.output_dir / BEST_CHECKPOINT

    def _tensorboard_writer(self, start: int) -> TensorBoardWriter:
        """The writer of a fit that starts after ``start`` completed epochs: a fresh run
        (``start`` 0) removes the event files an earlier run left in this folder; a resumed one
        keeps them and writes from step ``start + 1`` on (``purge_step``)."""
        log_dir = self.output_dir / TENSORBOARD_DIR
        if start == 0:
            for stale in _event_files(log_dir):
                stale.unlink()
        return TensorBoardWriter(log_dir, purge_step=start + 1)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]
                if p.requires_grad]

    def _frozen_meta(self) -> dict | None:
        """``{"sha256", "tensors"}`` of the frozen tensors (None when nothing is frozen)."""
        tensors = frozen_tensors(self.frozen, self.modules)
        return {"sha256": frozen_sha256(tensors), "tensors": len(tensors)} if tensors else None

    def _save(self, path: Path, epoch: int, history, best, state=None, *, kind: str = "last",
              step: int = 0, partial: dict | None = None, reason: str = "") -> None:
        started = time.perf_counter()
        save_checkpoint(path, stage=self.stage, epoch=epoch,
                        model=state if state is not None else clone_state(self.modules),
                        optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                        history=history, best=best, params=self.params, meta=self.meta,
                        kind=kind, step=step, partial=partial)
        self.writes.append({"kind": kind, "epoch": epoch, "step": step, "reason": reason,
                            "bytes": path.stat().st_size,
                            "seconds": time.perf_counter() - started})

    def save_kept(self, fit: "FitResult") -> None:
        """Write the modules' current state (the last epoch) as ``best.pt``, the kept state
        every reader of the run loads, when the run keeps its last epoch instead of choosing
        one on validation (nothing is written when no epoch ran)."""
        if not fit.history:
            return
        epoch = fit.history[-1]["epoch"]
        self._save(self.best_path, epoch, fit.history,
                   {"epoch": epoch, "score": None, "metric": "last epoch"}, kind="best",
                   reason="kept")

    def _resume(self) -> tuple[int, list, dict, dict | None, dict | None]:
        """(completed epochs, history, best, best state, the running epoch's ``partial``)."""
        if not self.last_path.is_file():
            return 0, [], {}, None, None
        ckpt = load_checkpoint(self.last_path, stage=self.stage)
        check_meta(self.last_path, ckpt.get("meta") or {}, self.meta)
        check_frozen(self.last_path, ckpt.get("meta") or {}, self.meta.get("frozen"))
        if ckpt["format"] != FORMAT:
            print(f"{self.last_path} is a checkpoint of an earlier workbench ({ckpt['format']}): "
                  f"resuming from it after epoch {ckpt['epoch']}; it did not record its frozen "
                  f"weights, so they are not checked (the next write is in {FORMAT})")
        if ckpt.get("kind", "last") != "last" or ckpt.get("optimizer") is None:
            raise CheckpointError(f"{self.last_path} holds no optimizer state (a kept best.pt "
                                  f"copied over last.pt?); delete it to start over, or run "
                                  f"without resume in a new output_dir")
        try:
            for name, module in self.modules.items():
                if name not in ckpt["model"]:
                    raise CheckpointError(f"{self.last_path} has no state for {name!r}")
                module.load_state_dict(ckpt["model"][name])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt["scheduler"] is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt["scaler"] is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            restore_rng_state(ckpt["rng"])
            best_state = None
            if ckpt["best"] and self.best_path.is_file():
                best_state = load_checkpoint(self.best_path, stage=self.stage)["model"]
            partial = ckpt.get("partial")
            if partial is not None:  # the stop's RNG comes back after the replayed batches
                partial = {**partial, "rng": ckpt["rng"], "step": int(ckpt["step"])}
            return ckpt["epoch"], ckpt["history"], ckpt["best"], best_state, partial
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            # a shape or parameter-group mismatch (image size, center loss on/off, ...) that the
            # meta check does not cover: name the file and the settings, not torch's traceback
            detail = " ".join(str(exc).split())[:240]
            raise CheckpointError(
                f"checkpoint {self.last_path} does not fit this run ({type(exc).__name__}: "
                f"{detail}){_changed_params(ckpt.get('params'), self.params)}; resume with the "
                f"settings it was made with, or run without resume in a new output_dir"
            ) from None

    def fit(self, epochs: int, resume: bool = False) -> FitResult:
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        frozen = self._frozen_meta()
        if frozen is not None:
            self.meta["frozen"] = frozen
        start, history, best, best_state, partial = \
            self._resume() if resume else (0, [], {}, None, None)
        resumed_from = start if resume and (start > 0 or partial is not None) else None
        if resumed_from is not None:
            where = f"in epoch {start + 1} after step {partial['step']}" if partial else \
                f"after epoch {start}"
            print(f"resuming {self.stage} from {self.last_path} {where}")
        with _StopSignals() as stop:
            return self._fit(epochs, start, history, best, best_state, partial, resumed_from,
                             stop)

    def _fit(self, epochs, start, history, best, best_state, partial, resumed_from,
             stop: "_StopSignals") -> FitResult:
        stopped_early = False
        epoch_times = []
        params = self._trainable()
        clock = _CheckpointClock(self.checkpoint_every, self.checkpoint_minutes)
        board = self._tensorboard_writer(start) if self.tensorboard and start < epochs else None
        bar = tqdm(range(start, epochs), desc=f"{self.stage} epochs", disable=not self.progress,
                   initial=start, total=epochs)
        for epoch in bar:
            started = time.time()
            for m in self.modules.values():
                m.train()
            sums = _LossSums(self.stage, epoch + 1, self.last_path)
            n_batches = n_items = 0
            lr = self.optimizer.param_groups[0]["lr"]
            lr_groups = _lr_groups(self.optimizer)
            if partial is not None:  # the epoch a stop signal interrupted: replay its start
                restore_rng_state(partial["rng_epoch_start"])
            epoch_rng = rng_state()  # what a mid-epoch checkpoint replays the epoch from
            batches = iter(self.batches(epoch))
            if partial is not None:
                n_batches, n_items = _skip_trained(batches, partial, self.last_path)
                sums.restore(partial["loss_sums"], n_batches, self.device)
                started -= float(partial["seconds"])
                restore_rng_state(partial["rng"])
                partial = None
            steps = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False,
                         disable=not self.progress, initial=n_batches)
            for batch in steps:
                self.optimizer.zero_grad(set_to_none=True)
                with self.precision.autocast():
                    parts = self.step(batch)
                loss = parts["loss"]
                self.scaler.scale(loss).backward()
                if self.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(params, self.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                sums.add(parts)
                n_batches += 1
                n_items += _batch_size(batch)
                if n_batches % self.read_every == 0:
                    running = sums.read()  # the one wait on the device in read_every steps
                    steps.set_postfix(loss=f"{running['loss'] / n_batches:.4f}", refresh=False)
                if stop.received or clock.time_due():
                    reason = stop.received or f"{self.checkpoint_minutes:g} minutes"
                    self._save(self.last_path, epoch, history, best, step=n_batches,
                               reason=reason, partial={
                                   "loss_sums": sums.state(), "batches": n_batches,
                                   "images": n_items, "seconds": time.time() - started,
                                   "rng_epoch_start": epoch_rng})
                    clock.written()
                    if stop.received:
                        steps.close()
                        self._stopped(stop.received, epoch, n_batches)
            steps.close()
            totals = sums.read()  # before the scheduler, validation and every save
            if self.scheduler is not None:
                self.scheduler.step()  # once per epoch
            record = {"epoch": epoch + 1, "lr": lr, "images": n_items,
                      "loss": {k: v / max(1, n_batches) for k, v in totals.items()}}
            if self.validate is not None and ((epoch + 1) % self.eval_every == 0
                                              or epoch + 1 == epochs):
                for m in self.modules.values():
                    m.eval()
                with torch.no_grad():
                    record["val"] = {k: float(v) for k, v in self.validate().items()}
                score = record["val"][self.select_metric]
                if not best or score > best["score"] or (self.ties_keep_later
                                                         and score == best["score"]):
                    best = {"epoch": epoch + 1, "score": score, "metric": self.select_metric}
                    best_state = clone_state(self.modules)
                    self._save(self.best_path, epoch + 1, history + [record], best, best_state,
                               kind="best", reason="validation gain")
            record["seconds"] = time.time() - started
            epoch_times.append(record["seconds"])
            history.append(record)
            since_best = epoch + 1 - best["epoch"] if best else 0
            stopped_early = bool(self.patience and since_best >= self.patience)
            reason = ("last epoch" if epoch + 1 == epochs else "early stop" if stopped_early
                      else stop.received or ("checkpoint_every" if clock.epoch_due(epoch + 1)
                                             else "checkpoint_minutes" if clock.time_due()
                                             else None))
            if reason:  # before the callbacks: what they report is saved
                self._save(self.last_path, epoch + 1, history, best, reason=reason)
                clock.written()
            print(_summary(self.stage, record, epochs, best))
            if board is not None:
                board(record, lr_groups)
            for cb in self.callbacks:
                cb(record)
            if stop.received and epoch + 1 < epochs and not stopped_early:
                self._stopped(stop.received, epoch + 1, 0)
            if stopped_early:
                print(f"early stop: no {self.select_metric} gain for {since_best} epochs")
                break
        bar.close()
        if board is not None:
            board.close()
        return FitResult(history=history, best_epoch=best.get("epoch") if best else None,
                         best_score=best.get("score") if best else None, best_state=best_state,
                         epochs_run=len(history), stopped_early=stopped_early,
                         resumed_from=resumed_from, best_metric=self.select_metric,
                         seconds_per_epoch=(sum(epoch_times) / len(epoch_times)
                                            if epoch_times else 0.0),
                         extra={"checkpoints": list(self.writes)})

    def _stopped(self, signal_name: str, epoch: int, step: int) -> None:
        """Raise :class:`TrainingStopped` after the stop's ``last.pt`` was written."""
        where = f"epoch {epoch + 1} after step {step}" if step else f"after epoch {epoch}"
        write = self.writes[-1]
        message = (f"{self.stage} stopped by {signal_name} in {where}: {self.last_path} written "
                   f"({write['bytes'] / 1e6:.1f} MB in {write['seconds']:.2f} s); run again "
                   f"with resume=True to continue from there")
        print(message, flush=True)
        raise TrainingStopped(message, signal_name, epoch, step)


def _skip_trained(batches, partial: Mapping[str, Any], last_path: Path) -> tuple[int, int]:
    """Draw (and drop) the batches the interrupted run already trained on; returns (batches,
    images) of the epoch so far as the checkpoint recorded them."""
    for done in range(int(partial["batches"])):
        if next(batches, None) is None:
            raise CheckpointError(
                f"{last_path} stopped after step {partial['batches']} of its epoch, but the "
                f"epoch now has only {done} batches (the data or batch settings changed?); "
                f"resume with the settings it was made with, or start afresh in a new "
                f"output_dir")
    return int(partial["batches"]), int(partial["images"])


class _LossSums:
    """An epoch's running sums of the loss parts, kept on the device until read.

    ``add`` launches one addition per part and never waits; ``read`` copies every sum to the host
    in one transfer (one wait) and raises :class:`FloatingPointError` when the total ``loss``
    became non-finite since the previous read (a NaN or inf stays in a sum once added), naming
    those steps. float64 on CUDA and CPU: the same additions, in the same order, as the Python
    floats of a per-step read (MPS has no float64: float32 there)."""

    def __init__(self, stage: str, epoch: int, last_path: Path):
        self.stage, self.epoch, self.last_path = stage, epoch, last_path
        self._sums: dict[str, torch.Tensor] = {}
        self.steps = 0  # steps added
        self._read_through = 0  # steps covered by the last read

    def add(self, parts: Mapping[str, torch.Tensor]) -> None:
        for name, value in parts.items():
            value = value.detach()
            value = value.to(torch.float32 if value.device.type == "mps" else torch.float64)
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self.steps += 1

    def state(self) -> dict[str, torch.Tensor]:
        """The sums as CPU tensors (a mid-epoch checkpoint's), read through :meth:`read` first
        so that a non-finite loss stops the run before it is saved."""
        self.read()
        return {name: value.detach().cpu() for name, value in self._sums.items()}

    def restore(self, sums: Mapping[str, torch.Tensor], steps: int,
                device: torch.device) -> None:
        """Carry on the sums of a mid-epoch checkpoint (the same values, so the epoch's means
        are those of a run that was never stopped)."""
        self._sums = {name: value.to(device) for name, value in sums.items()}
        self.steps = self._read_through = int(steps)

    def read(self) -> dict[str, float]:
        """``{part: sum over the epoch's steps so far}`` as Python floats."""
        if not self._sums:
            return {}
        names = list(self._sums)
        values = dict(zip(names, torch.stack([self._sums[n] for n in names]).tolist()))
        first, last = self._read_through + 1, self.steps
        self._read_through = self.steps
        if not math.isfinite(values.get("loss", 0.0)):
            bad = ", ".join(n for n in names if not math.isfinite(values[n]))
            where = f"step {last}" if first == last else f"steps {first} and {last}"
            raise FloatingPointError(
                f"{self.stage} epoch {self.epoch}: a non-finite loss between {where} "
                f"(non-finite parts: {bad}); lower lr (or grad_clip). The run stopped before "
                f"saving anything of this epoch: {self.last_path}, if any, holds only the "
                f"epochs before it")
        return values


def _changed_params(saved, current: Mapping[str, Any]) -> str:
    """The parameters (besides ``resume``, ``epochs`` and when to checkpoint) whose value
    differs from a checkpoint's."""
    if not isinstance(saved, Mapping):
        return ""
    changed = sorted(k for k in set(saved) & set(current)
                     if k not in ("resume", "epochs", "checkpoint_every", "checkpoint_minutes")
                     and saved[k] != current[k])
    return (f"; parameters that differ from the checkpoint's: "
            f"{', '.join(f'{k} ({saved[k]!r} -> {current[k]!r})' for k in changed)}"
            if changed else "")


def _batch_size(batch) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else 0


def _summary(stage: str, record: dict, epochs: int, best: dict) -> str:
    losses = record["loss"]
    parts = ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "loss")
    text = (f"[{stage}] epoch {record['epoch']}/{epochs} · loss {losses.get('loss', 0):.4f}"
            + (f" ({parts})" if parts else "") + f" · lr {record['lr']:.2e}")
    if "val" in record:
        text += " · val " + " ".join(f"{k} {record['val'][k]:.1f}"
                                     for k in ("rank1", "mAP", "accuracy") if k in record["val"])
        if best and best.get("epoch") == record["epoch"]:
            text += " *best*"
    return text + f" · {record.get('seconds', 0):.1f} s"
