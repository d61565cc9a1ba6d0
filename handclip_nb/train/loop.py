"""The shared training loop of every stage: one place for the order of operations.

Per batch: ``zero_grad`` → forward (under the run's :class:`~handclip_nb.device.Precision`:
fp32, fp16 autocast, or bf16 autocast; mixed precision on CUDA only unless a caller passes a
CPU precision explicitly, as the tests do) → ``backward`` (scaled for fp16) → unscale + clip the
gradient norm → ``optimizer.step()`` (docs/mistakes.md #8: clipping after ``step`` did nothing).
Per epoch: ``scheduler.step()`` once → validation every ``eval_every`` epochs on the
model-selection split (training identities only, docs/mistakes.md #1) → the best state is *copied*
(cloned tensors, docs/mistakes.md #3) and saved → ``last.pt`` written atomically with optimiser,
scheduler and RNG states, so ``resume=True`` continues exactly where a killed run stopped.

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
from ..checkpoint import (CheckpointError, check_meta, load_checkpoint, restore_rng_state,
                         save_checkpoint)

__all__ = ["TrainLoop", "FitResult", "clone_state", "compiled", "run_precision",
           "TensorBoardWriter", "TENSORBOARD_DIR", "LOSS_READ_EVERY"]

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
                 tensorboard: bool = True, read_every: int = LOSS_READ_EVERY):
        if int(read_every) < 1:
            raise ValueError(f"read_every must be a number of steps >= 1, got {read_every!r}")
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

    def _save(self, path: Path, epoch: int, history, best, state=None) -> None:
        save_checkpoint(path, stage=self.stage, epoch=epoch,
                        model=state if state is not None else clone_state(self.modules),
                        optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                        history=history, best=best, params=self.params, meta=self.meta)

    def save_kept(self, fit: "FitResult") -> None:
        """Write the modules' current state (the last epoch) as ``best.pt``, the kept state
        every reader of the run loads, when the run keeps its last epoch instead of choosing
        one on validation (nothing is written when no epoch ran)."""
        if not fit.history:
            return
        epoch = fit.history[-1]["epoch"]
        self._save(self.best_path, epoch, fit.history,
                   {"epoch": epoch, "score": None, "metric": "last epoch"})

    def _resume(self) -> tuple[int, list, dict, dict | None]:
        if not self.last_path.is_file():
            return 0, [], {}, None
        ckpt = load_checkpoint(self.last_path, stage=self.stage)
        check_meta(self.last_path, ckpt.get("meta") or {}, self.meta)
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
            return ckpt["epoch"], ckpt["history"], ckpt["best"], best_state
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
        start, history, best, best_state = self._resume() if resume else (0, [], {}, None)
        resumed_from = start if resume and start > 0 else None
        if resumed_from:
            print(f"resuming {self.stage} from {self.last_path} after epoch {start}")
        stopped_early = False
        epoch_times = []
        params = self._trainable()
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
            steps = tqdm(self.batches(epoch), desc=f"epoch {epoch + 1}", leave=False,
                         disable=not self.progress)
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
                    self._save(self.best_path, epoch + 1, history + [record], best, best_state)
            record["seconds"] = time.time() - started
            epoch_times.append(record["seconds"])
            history.append(record)
            self._save(self.last_path, epoch + 1, history, best)
            print(_summary(self.stage, record, epochs, best))
            if board is not None:
                board(record, lr_groups)
            for cb in self.callbacks:
                cb(record)
            since_best = epoch + 1 - best["epoch"] if best else 0
            if self.patience and since_best >= self.patience:
                print(f"early stop: no {self.select_metric} gain for {since_best} epochs")
                stopped_early = True
                break
        bar.close()
        if board is not None:
            board.close()
        return FitResult(history=history, best_epoch=best.get("epoch") if best else None,
                         best_score=best.get("score") if best else None, best_state=best_state,
                         epochs_run=len(history), stopped_early=stopped_early,
                         resumed_from=resumed_from, best_metric=self.select_metric,
                         seconds_per_epoch=(sum(epoch_times) / len(epoch_times)
                                            if epoch_times else 0.0))


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
    """The parameters (besides ``resume``/``epochs``) whose value differs from a checkpoint's."""
    if not isinstance(saved, Mapping):
        return ""
    changed = sorted(k for k in set(saved) & set(current)
                     if k not in ("resume", "epochs") and saved[k] != current[k])
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
