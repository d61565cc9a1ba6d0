"""Weight files of the backbones: where to look (and, for OpenAI's checkpoints, downloading
them on first use through :mod:`.weight_download`), the shipped file's SHA-256, OpenAI's
TorchScript releases and plain state dicts, our own ``save_weights`` format, and errors that
say what was looked at and how to fix it."""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

with warnings.catch_warnings():  # openai-clip imports pkg_resources, which warns on import
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    import clip
    from clip.model import CLIP, VisionTransformer, build_model

from ..backbone_specs import BACKBONES, BackboneSpec
from .clip_arch import arch_from_state_dict, arch_of, describe_arch
from .weight_download import (MIRROR_ENV, OFFLINE_ENV, DownloadError, DownloadSource,
                              download_source, download_verified, offline_from_env, url_env_name)

__all__ = ["WeightsNotFoundError", "WeightsDownloadError", "IncompatibleWeightsError", "SAVE_FORMAT", "default_cache_dir",
           "resolve_weights_file", "is_torchscript_archive", "read_checkpoint",
           "read_torchscript_state_dict", "load_into", "check_openai_arch", "load_openai_jit",
           "build_openai_state_dict"]

#: Format tag written by :meth:`ClipBackbone.save_weights`.
SAVE_FORMAT = "handclip_nb.backbone/1"


class WeightsNotFoundError(FileNotFoundError):
    """No weight file for a backbone; the message says where we looked and how to supply it."""

    def __init__(self, message: str, *, backbone: str, searched: Sequence[str], url: Optional[str] = None):
        super().__init__(message)
        self.backbone = backbone
        self.searched = [str(p) for p in searched]
        self.url = url

    def __str__(self) -> str:  # FileNotFoundError's default str() would drop the message
        return self.args[0]


class WeightsDownloadError(WeightsNotFoundError):
    """Downloading a missing checkpoint failed (no network, HTTP error, truncated or corrupt
    file); nothing was left at the final path."""


class IncompatibleWeightsError(ValueError):
    """A weight file cannot be read as a CLIP checkpoint or does not fit the requested backbone."""



def default_cache_dir() -> str:
    """``~/.cache/clip``, where ``clip.load`` keeps downloaded weights (evaluated at call time)."""
    return os.path.expanduser("~/.cache/clip")



def is_torchscript_archive(path: Path) -> bool:
    """True for TorchScript zip archives (OpenAI's released ``.pt`` files are these)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names)



def _not_found(spec: BackboneSpec, searched: Sequence[str], explicit: Optional[str],
               source: Optional[DownloadSource] = None,
               failure: Optional[DownloadError] = None) -> WeightsNotFoundError:
    """The error for a missing file: where we looked, why nothing was downloaded (downloads
    off, or the download's failure), and every way to supply the file."""
    base = (source.file_name if source is not None else spec.weights_basename) or \
        (os.path.basename(spec.weights_file) if spec.weights_file else "weights.pt")
    lines = [f"No weight file for backbone {spec.name!r} ({spec.description})."]
    if explicit is not None:
        lines.append(f"weights={explicit!r}: file not found (looked at: {', '.join(searched)}).")
    else:
        lines.append("Looked for:")
        lines += [f"  - {p}" for p in searched]
    if failure is not None:
        lines.append(f"Downloading it from {source.url} into {Path(searched[0]).parent} failed: "
                     f"{failure}. Nothing was kept.")
        lines.append(f"Without a network, supply the file in one of these ways (and set "
                     f"download=False or {OFFLINE_ENV}=1 to skip the download):")
    elif source is not None:
        lines.append(f"Downloads are off (download=False, or {OFFLINE_ENV}=1 in the environment). "
                     f"Supply the file in one of these ways:")
    else:
        lines.append("Supply the file in one of these ways:")
    lines.append(f"  - pass weights='/path/to/{base}' (papermill: -p weights /path/to/{base});")
    if spec.openai_name is not None:
        lines.append(f"  - place {base} in {default_cache_dir()} (clip's cache, ~/.cache/clip);")
        lines.append(f"  - or pass download_root='/some/dir' for a folder that holds {base}.")
        url = source.url if source is not None else spec.url
        sha = source.sha256 if source is not None else spec.sha256
        lines.append(f"The file is at {url} (sha256 {sha}); with a network, download=True "
                     f"(the default) fetches it on first use (an internal mirror: "
                     f"{MIRROR_ENV}=<base URL> or {url_env_name(spec)}=<URL>).")
    lines.append("For runs without weights use the untrained backbones 'tiny-vit' or 'tiny-rn'.")
    error = WeightsNotFoundError if failure is None else WeightsDownloadError
    return error("\n".join(lines), backbone=spec.name, searched=searched,
                 url=source.url if source is not None else spec.url)


def resolve_weights_file(spec: BackboneSpec, weights, download_root,
                         download: bool = True) -> Optional[Path]:
    """The weight file to load, ``None`` for a random-init arch, or raise WeightsNotFoundError.

    An OpenAI entry's file is looked for in ``download_root`` then ``~/.cache/clip``; where
    neither holds it and downloads are on (``download`` and no ``HANDCLIP_OFFLINE=1``), it is
    downloaded into the first of them (:func:`.weight_download.download_verified`)."""
    if weights is not None:
        p = Path(os.path.expanduser(os.fspath(weights)))
        if p.is_dir():  # a folder holding the expected file
            name = spec.weights_basename or (os.path.basename(spec.weights_file) if spec.weights_file else None)
            cand = p / name if name else p
            if name and cand.is_file():
                return cand
            raise _not_found(spec, [str(cand)], os.fspath(weights))
        if p.is_file():
            return p
        raise _not_found(spec, [str(p)], os.fspath(weights))
    if spec.openai_name is not None:
        source = download_source(spec)  # the environment may name another address and file
        dirs = []
        if download_root is not None:
            dirs.append(Path(os.path.expanduser(os.fspath(download_root))))
        dirs.append(Path(default_cache_dir()))
        cands = [d / source.file_name for d in dirs]
        for c in cands:
            if c.is_file():
                return c
        if not download or offline_from_env():
            raise _not_found(spec, [str(c) for c in cands], None, source)
        try:
            return download_verified(source, dirs[0])
        except DownloadError as exc:
            raise _not_found(spec, [str(c) for c in cands], None, source, exc) from exc
    if spec.weights_file is not None:
        p = Path(spec.weights_file)
        if p.is_file():
            _check_shipped_sha256(spec, p)
            return p
        raise _not_found(spec, [str(p)], None)
    return None


def _check_shipped_sha256(spec: BackboneSpec, path: Path) -> None:
    """A shipped file must match its recorded SHA-256 (a git-lfs pointer or a truncated copy
    would otherwise fail later with a confusing unpickling error)."""
    if spec.weights_sha256_file is None:
        return
    record = Path(spec.weights_sha256_file)
    if not record.is_file():
        raise IncompatibleWeightsError(f"{record} is missing: the SHA-256 of the shipped weights "
                                       f"{path} cannot be checked; reinstall the package")
    expected = record.read_text().split()[0].strip().lower()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise IncompatibleWeightsError(
            f"shipped weights {path} have SHA-256 {h.hexdigest()}, but {record} records {expected}: "
            f"the file is corrupt, truncated or a git-lfs pointer; restore it from the repository "
            f"(git checkout -- {path.name}) or re-run notebooks/pretrain_mini.ipynb")


def read_checkpoint(path: Path, spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(state_dict, meta) of a non-TorchScript checkpoint; meta is set for ``save_weights`` files."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleWeightsError(
            f"cannot read {path} as weights for backbone {spec.name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    meta = None
    if isinstance(obj, dict) and obj.get("format") == SAVE_FORMAT:
        meta, obj = obj, obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(t, torch.Tensor) for t in obj.values()):
        raise IncompatibleWeightsError(f"{path} does not hold a CLIP state dict (backbone {spec.name!r})")
    sd = {k[len("clip."):] if k.startswith("clip.") else k: t for k, t in obj.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # as clip.model.build_model
        sd.pop(key, None)
    return sd, meta


def load_into(model: CLIP, sd: Mapping[str, torch.Tensor], path: Path, spec: BackboneSpec) -> None:
    """Strict load with an error naming checkpoint, backbone and the offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        holds = arch_from_state_dict(sd)
        parts = [f"weights {path} do not fit backbone {spec.name!r} ({describe_arch(arch_of(model))})."]
        if holds:
            parts.append(f"The checkpoint holds: {holds}.")
        if mismatched:
            parts.append("Shape mismatches: " + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise IncompatibleWeightsError(" ".join(parts))
    model.load_state_dict(sd, strict=True)


def check_openai_arch(model: CLIP, spec: BackboneSpec, path: Path) -> None:
    if spec.expected is None:
        return
    arch = arch_of(model)
    is_vit = isinstance(model.visual, VisionTransformer)
    family = spec.expected[0]
    if (family == "vit") != is_vit or (is_vit and arch["vision_patch_size"] != spec.expected[1]):
        want = f"ViT patch {spec.expected[1]}" if family == "vit" else "ResNet"
        raise IncompatibleWeightsError(
            f"weights {path} hold a CLIP with {describe_arch(arch)}, but backbone {spec.name!r} is a {want}; "
            f"pick the backbone that matches the file (valid names: {', '.join(BACKBONES)})"
        )
    if family == "vit":
        standard = (arch["vision_width"], arch["vision_layers"]) == tuple(spec.expected[2:])
    else:
        standard = (tuple(arch["vision_layers"]), arch["vision_width"]) == tuple(spec.expected[1:])
    if not standard:
        warnings.warn(
            f"weights {path} hold a CLIP with {describe_arch(arch)}, not the standard {spec.description}; "
            f"using it as backbone {spec.name!r}",
            stacklevel=3,
        )


def load_openai_jit(path: Path, spec: BackboneSpec, download_root) -> CLIP:
    """OpenAI's TorchScript release file -> CLIP through ``clip.load`` (fp32 on CPU)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated.*")
            model, _ = clip.load(str(path), device="cpu", jit=False,
                                 download_root=None if download_root is None else os.fspath(download_root))
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleWeightsError(
            f"clip.load could not read {path} for backbone {spec.name!r} ({type(exc).__name__}: {exc}); "
            f"the file may be truncated: compare its sha256 with {spec.sha256 or 'the release'}"
        ) from exc
    return model


def build_openai_state_dict(sd: Mapping[str, torch.Tensor], path: Path, spec: BackboneSpec) -> CLIP:
    """What ``clip.load`` does for a non-TorchScript file: ``clip.model.build_model(state_dict)``.

    (``clip.load`` itself cannot do it with current torch: after its ``torch.jit.load`` attempt fails,
    it calls ``torch.load`` on the same file object, now at EOF.) Like ``clip.load``, ``build_model``
    rounds conv/linear/attention/projection weights to fp16; we return the model in fp32.
    """
    try:
        return build_model(dict(sd))
    except Exception as exc:  # noqa: BLE001
        holds = arch_from_state_dict(sd)
        raise IncompatibleWeightsError(
            f"weights {path} are not an OpenAI CLIP state dict usable for backbone {spec.name!r}"
            + (f" (it holds {holds})" if holds else "") + f": {type(exc).__name__}: {exc}"
        ) from exc


def read_torchscript_state_dict(path: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated.*")
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleWeightsError(f"cannot read TorchScript archive {path} for backbone {spec.name!r}: {exc}") from exc
    sd = dict(sd)
    for key in ("input_resolution", "context_length", "vocab_size"):
        sd.pop(key, None)
    return sd

