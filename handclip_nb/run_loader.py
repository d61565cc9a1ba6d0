"""The one run loader: rebuild any stage-0/1/2/3 or CLIP-HandID run folder from its ``params.yaml`` and its
checkpoint.

:func:`load_run` reads the run's resolved parameters (what it was trained with: backbone,
weights, image size, resize mode), builds the backbone from them, and hands the folder to the
loader registered for its stage (:data:`RUN_LOADERS`, :func:`register_run_loader`):

* ``stage0`` (zero-shot): the backbone; its ranking feature is the global image embedding;
* ``stage1``: the backbone + the learned prompts (``prompts.pt``) as a
  :class:`~handclip_nb.models.prompts.PromptLearner`; its images rank as zero-shot;
* ``stage2``: backbone + CLIP-ReID head from ``checkpoints/best.pt``;
* ``stage3``: PromptSG from ``checkpoints/best.pt``, ranked with the run's ``prompt_mode``;
* ``handid``: CLIP-HandID from ``checkpoints/best.pt``, ranked by its two BN outputs.

Every caller that reads a run folder uses it: the evaluation notebook (cross-run comparison),
stage 2 (stage 1's prompts), stage 3 (the warm start from a stage-2 run) and the attention
notebook (a stage-3 run). The *training* data need not be present: the number of identities
and the classifier come from the checkpoint's ``meta``.

A caller that already holds the backbone passes it (``backbone=``): the run's trained state is
then loaded into that backbone (stage 3's warm start is exactly this).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from .checkpoint import (CheckpointError, check_frozen, check_meta, frozen_sha256,
                         frozen_tensors, load_checkpoint)
from .constants import HD_ASPECT
from .data.images import ImageSource, image_source
from .device import Precision, resolve_device, run_precision
from .models.backbones import backbone_from_params
from .models.handid import HandIDModel
from .models.prompts import PromptLearner
from .models.promptsg import PromptSG
from .models.reid import ReIDModel
from .runs import (BEST_CHECKPOINT, METRICS_FILE, PARAMS_FILE, PROMPTS_FILE, RunFolderError,
                   domain_name, read_metrics, resolve_path)

# RunFolderError lives with the run-folder layout (runs); it is re-exported here because every
# error this module raises about a folder is one

__all__ = ["RunFolderError", "RunInfo", "LoadedRun", "RUN_LOADERS", "register_run_loader",
           "load_run", "check_stage", "zero_shot_run", "read_run_folder"]


@dataclass(frozen=True)
class RunInfo:
    """What a report says about a run (no model: cheap to keep around)."""

    name: str
    folder: str | None  # None: a zero-shot backbone named by parameters, no run folder
    stage: str
    params: Mapping[str, Any]  # the run's own parameters: what it was trained on
    recorded: Mapping[str, Any] | None  # its metrics.json (None if unfinished or no folder)
    backbone_display: str
    prompt_mode: str | None = None  # stage 3: the inference prompt used

    @property
    def trained_on(self) -> str:
        if self.stage == "stage0":
            return "zero-shot"
        return domain_name(self.params["dataset"], self.params.get("aspect"))


@dataclass
class LoadedRun:
    """A run rebuilt for inference: ``embed`` maps an image batch to its ranking feature."""

    info: RunInfo
    backbone: Any  # ClipBackbone
    model: torch.nn.Module | None  # ReIDModel, PromptSG, PromptLearner (stage 1) or None
    encode: Callable[[torch.Tensor], torch.Tensor] | None  # None = the global embedding
    cache_tag: str | None  # identifies ``encode`` for the feature cache
    meta: dict = field(default_factory=dict)  # the checkpoint's (or prompts') meta

    @property
    def stage(self) -> str:
        return self.info.stage

    @property
    def params(self) -> Mapping[str, Any]:
        return self.info.params

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def precision(self) -> Precision:
        """The autocast the run's features are encoded in: its own ``amp`` / ``amp_dtype`` on
        the device it is loaded on (fp32 on a CPU)."""
        return run_precision(self.params, self.device)

    def image_source(self, params: Mapping[str, Any] | None = None) -> ImageSource:
        """The evaluation images of the run's backbone (its image size, resize mode and
        normalisation), decoded as ``params`` say (``decode_cache``, ``reduced_jpeg_decode``;
        default: the run's own parameters)."""
        return image_source(self.backbone.preprocess_config(),
                            self.params if params is None else params)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Ranking features of a preprocessed batch (not L2-normalised)."""
        if self.encode is not None:
            return self.encode(images)
        return self.backbone.encode_image(images).global_embedding


def read_run_folder(run_dir: str | Path, require_finished: bool = True
                    ) -> tuple[Path, dict, dict | None]:
    """(folder, its resolved parameters, its metrics.json or None), or a RunFolderError that
    names the folder as the user wrote it and the fix."""
    folder = resolve_path(run_dir)
    if not folder.is_dir():
        raise RunFolderError(
            f"run folder {folder} (given as {str(run_dir)!r}) does not exist. Fix: correct the "
            f"path, or first run the stage notebook with output_dir={run_dir}")
    params_path = folder / PARAMS_FILE
    if not params_path.is_file():
        raise RunFolderError(
            f"{folder} is not a run folder: it has no {PARAMS_FILE}. Fix: give the output_dir "
            f"of a stage notebook run")
    finished = (folder / METRICS_FILE).is_file()
    if require_finished and not finished:
        raise RunFolderError(
            f"run {folder} has not finished: its {METRICS_FILE} (written last, when the run "
            f"completes) is missing. Fix: run the notebook to the end (a training stage "
            f"continues with -p resume true -p output_dir {run_dir}), or leave it out")
    try:
        params = (yaml.safe_load(params_path.read_text()) or {}).get("params") or {}
    except yaml.YAMLError as exc:
        raise RunFolderError(f"{params_path} is not valid YAML ({exc}); the folder was edited "
                             f"or truncated: re-run the stage") from None
    if not params or not params.get("stage"):
        raise RunFolderError(f"{params_path} holds no resolved parameters (it was not written "
                             f"by a stage notebook); give a stage run's output_dir")
    return folder, params, read_metrics(folder) if finished else None


#: stage -> loader(folder, params, backbone) -> (model, encode, cache_tag, display, meta, extra)
RUN_LOADERS: dict[str, Callable[..., dict]] = {}


def register_run_loader(stage: str):
    """Decorator: ``fn(folder, params, backbone) -> dict`` rebuilds ``stage`` runs. The dict
    may hold ``model``, ``encode``, ``cache_tag``, ``display``, ``meta`` and ``prompt_mode``."""
    def add(fn):
        RUN_LOADERS[stage] = fn
        return fn
    return add


def check_stage(folder: Path, params: Mapping, stages: tuple[str, ...] | None = None) -> None:
    """Refuse a run whose stage has no loader, or is not one of ``stages`` (the caller's),
    saying what to use instead; nothing is built."""
    stage = params["stage"]
    if stage == "attention":
        raise ValueError(f"{folder} is an attention run (figures only); use the stage-3 run it "
                         f"shows instead: {params.get('stage3_dir')}")
    if stage not in RUN_LOADERS:
        raise ValueError(f"{folder}: cannot rebuild a {stage!r} run; stages with a run loader: "
                         f"{', '.join(RUN_LOADERS)}")
    if stages is not None and stage not in stages:
        raise ValueError(f"{folder} is a {stage} run; expected a run of "
                         f"{' or '.join(stages)} here")


def load_run(run_dir: str | Path, device: str | torch.device = "auto", *, backbone=None,
             name: str | None = None, require_finished: bool = True,
             stages: tuple[str, ...] | None = None) -> LoadedRun:
    """Rebuild the run in ``run_dir`` (see the module docstring).

    ``backbone``: a built backbone to load the run into (its name must be the run's);
    ``require_finished``: refuse a folder without ``metrics.json`` (stage 2 reads stage 1's
    prompts and stage 3 a stage-2 checkpoint before those runs' final reports exist, so they
    pass False); ``stages``: the stages the caller accepts (others raise ``ValueError``
    naming what to pass instead). Errors: :class:`RunFolderError` for a missing, foreign or
    unfinished folder, :class:`~handclip_nb.checkpoint.CheckpointError` for a checkpoint that
    does not fit the run's backbone.
    """
    folder, params, metrics = read_run_folder(run_dir, require_finished)
    check_stage(folder, params, stages)
    stage = params["stage"]
    params = dict(params)
    if backbone is None:
        params["device"] = str(resolve_device(device))
        backbone = backbone_from_params(params)
    else:
        if backbone.name != params["backbone"]:
            raise ValueError(
                f"{folder} is a {params['backbone']} run, but the backbone given to load it "
                f"into is {backbone.name!r}; use backbone {params['backbone']!r} (or another "
                f"run)")
        params["device"] = str(next(backbone.parameters()).device)
    parts = RUN_LOADERS[stage](folder, params, backbone)
    info = RunInfo(name=name or folder.name, folder=str(folder), stage=stage, params=params,
                   recorded=metrics,
                   backbone_display=parts.get("display", backbone.display_name),
                   prompt_mode=parts.get("prompt_mode"))
    return LoadedRun(info=info, backbone=backbone, model=parts.get("model"),
                     encode=parts.get("encode"), cache_tag=parts.get("cache_tag"),
                     meta=dict(parts.get("meta") or {}))


def zero_shot_run(params: Mapping) -> LoadedRun:
    """The zero-shot backbone named by ``params``, without a run folder."""
    backbone = backbone_from_params(params)
    info = RunInfo(name=f"zero-shot {params['backbone']}", folder=None, stage="stage0",
                   params=dict(params), recorded=None, backbone_display=backbone.display_name)
    return LoadedRun(info=info, backbone=backbone, model=None, encode=None, cache_tag=None)


# ----------------------------------------------------------------------------- the stages


@register_run_loader("stage0")
def _load_stage0(folder: Path, params: Mapping, backbone) -> dict:
    return {}


@register_run_loader("stage1")
def _load_stage1(folder: Path, params: Mapping, backbone) -> dict:
    """The learned prompts; the image side is the zero-shot backbone (stage 1 freezes it)."""
    path = folder / PROMPTS_FILE
    if not path.is_file():
        raise RunFolderError(
            f"no stage-1 prompts at {path}: the stage-1 run in {folder} did not get to the end "
            f"of its training. Fix: run notebooks/stage1_prompt.ipynb with output_dir={folder} "
            f"(-p resume true continues it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointError(f"{path} is corrupt or truncated ({type(exc).__name__}); re-run "
                              f"stage 1") from None
    try:
        learner = PromptLearner.from_checkpoint(state, backbone)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    learner = learner.to(next(backbone.parameters()).device)
    learner.image_mean = state.get("image_mean")
    learner.identities = [str(p) for p in state.get("meta", {}).get("identities") or []] or None
    return {"model": learner, "meta": dict(state.get("meta", {})),
            "display": f"{backbone.display_name} + stage-1 prompts"}


def _best_checkpoint(folder: Path, stage: str, backbone) -> dict:
    """``checkpoints/best.pt`` of a stage-2/3 run, checked against the backbone."""
    best = folder / BEST_CHECKPOINT
    if not best.is_file():
        raise RunFolderError(
            f"run {folder} has no {BEST_CHECKPOINT}: it never validated (epochs=0?), so there "
            f"is no trained state to load. Fix: train it for at least one epoch")
    ckpt = load_checkpoint(best, stage=stage)
    check_meta(best, ckpt["meta"], {"backbone": backbone.name})
    return ckpt


def _load_trained(folder: Path, ckpt: Mapping, model: torch.nn.Module) -> None:
    """Load the checkpoint's state into ``model``'s trainable modules; eval mode. The frozen
    weights (the text tower) are not in the checkpoint: they come from the backbone the model
    was built on, checked against the SHA-256 the run recorded (``meta["frozen"]``)."""
    trainable = model.trainable_modules()
    if ckpt["meta"].get("frozen"):
        tensors = frozen_tensors({"clip": model.backbone.clip}, trainable)
        check_frozen(folder / BEST_CHECKPOINT, ckpt["meta"],
                     {"sha256": frozen_sha256(tensors), "tensors": len(tensors)})
    for key, module in trainable.items():
        try:
            module.load_state_dict(ckpt["model"][key])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"{folder / BEST_CHECKPOINT}: its {key!r} state does not fit the model rebuilt "
                f"from {folder / PARAMS_FILE} ({str(exc).splitlines()[0][:200]}); was the "
                f"folder edited, or the checkpoint copied from another run?") from None
    model.eval()


def _cache_tag(stage: str, prompt_mode: str | None, ckpt: Mapping) -> str:
    """Identifies a run's ranking feature for the feature cache: the backbone fingerprint
    (part of every cache key) covers the image encoder, so the tag must tell the heads apart."""
    tag = hashlib.sha256(f"{stage}|{prompt_mode}".encode())
    for key in sorted(k for k in ckpt["model"] if k != "visual"):
        for pname, tensor in sorted(ckpt["model"][key].items()):
            tag.update(f"{key}.{pname}".encode())
            tag.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                       .numpy().tobytes())
    return tag.hexdigest()[:24]


@register_run_loader("stage2")
def _load_stage2(folder: Path, params: Mapping, backbone) -> dict:
    ckpt = _best_checkpoint(folder, "stage2", backbone)
    meta = ckpt["meta"]
    model = ReIDModel(backbone, int(meta["num_classes"]), meta["classifier"]).to(params["device"])
    _load_trained(folder, ckpt, model)
    return {"model": model, "encode": model.embed, "cache_tag": _cache_tag("stage2", None, ckpt),
            "meta": meta, "display": f"{backbone.display_name} + stage-2 fine-tuning"}


@register_run_loader("stage3")
def _load_stage3(folder: Path, params: Mapping, backbone) -> dict:
    ckpt = _best_checkpoint(folder, "stage3", backbone)
    meta = ckpt["meta"]
    # the prompt names the aspect the run was trained on (what its text side learned)
    aspect = HD_ASPECT if params["dataset"] == "hd" else params["aspect"]  # 11k, custom
    model = PromptSG(backbone, int(meta["num_classes"]), aspect=aspect,
                     classifier=meta["classifier"]).to(params["device"])
    _load_trained(folder, ckpt, model)
    prompt_mode = params.get("prompt_mode", "simplified")

    def encode(images, _model=model, _mode=prompt_mode):
        return _model.embed(images, prompt_mode=_mode)

    return {"model": model, "encode": encode, "cache_tag": _cache_tag("stage3", prompt_mode, ckpt),
            "meta": meta, "prompt_mode": prompt_mode,
            "display": f"{backbone.display_name} + PromptSG ({prompt_mode} prompt)"}


@register_run_loader("handid")
def _load_handid(folder: Path, params: Mapping, backbone) -> dict:
    ckpt = _best_checkpoint(folder, "handid", backbone)
    meta = ckpt["meta"]
    # the text-side options shape no tensor of the checkpoint but are the run's model
    model = HandIDModel(backbone, int(meta["num_classes"]),
                        inversion_grad=params.get("handid_inversion_grad", True),
                        token=params.get("handid_token", "whole"),
                        heads=params.get("handid_heads", "two"),
                        classifier=meta["classifier"]).to(params["device"])
    _load_trained(folder, ckpt, model)
    return {"model": model, "encode": model.embed, "cache_tag": _cache_tag("handid", None, ckpt),
            "meta": meta, "display": f"{backbone.display_name} + CLIP-HandID"}
