"""From an image file to the tensor a model sees: decode and resize once, augment every time.

On real photos (11k Hands: 1600×1200 JPEGs) an epoch is dominated by JPEG decoding: on one core
a full decode + letterbox + augmentation runs at about 18 images/s, while the same
augmentation on an image that is already decoded and resized runs at about 450 images/s. So the
path from a file to a tensor is split in two:

1. :func:`decode_resized` -- a deterministic function of (file, :class:`DecodeGeometry`): the
   file's pixels decoded (through the one opener, :mod:`.image_files`, turned as the EXIF
   orientation policy says) and resized to the run's input geometry by the backbone's resize
   mode (``transforms.resize_step``), as a uint8 ``[height, width, 3]`` array.
2. the tensor steps -- augmentation (training only), ``ToTensor``, ``Normalize``:
   ``transforms.build_transform(..., resized=True)``.

:class:`DecodeCache` memoises step 1 on disk (``outputs/.decode_cache/``), so each image is
decoded once and then shared by epochs, stages, runs and processes. An entry is keyed by the
file's absolute path, size and modification time and lives under a folder named by the
geometry (input size, resize mode, interpolation, fill colour, decode policy, EXIF orientation
policy), so a changed file, input size or resize mode is never served stale, and a photo
decoded as stored (sideways) is never served to a run that turns it upright. Entries are
``.npy`` files written to a temp name and renamed, so two runs building the same cache at once
never see a torn entry (the later rename wins with identical bytes); reads go through the OS
page cache, which all processes share.

Because the cache stores exactly what step 1 returns, a run with ``decode_cache`` on sees the
same pixels as one with it off: features and metrics are identical, tolerance 0
(``tests/test_decode_cache.py`` checks it).

**Reduced-scale JPEG decoding** (``reduced_jpeg_decode``, default on). A JPEG can be decoded at
1/2, 1/4 or 1/8 of its size by scaling the DCT (PIL's ``draft`` mode), several times faster than
a full decode. The decoder asks for the largest reduction that still leaves at least
:data:`DRAFT_MARGIN` × the size the image is resized to, so the final bicubic resize still
shrinks by at least that factor. The size is that of the picture as the orientation policy
turns it: a photo turned by 90 degrees (EXIF tags 5-8 under ``exif``) is resized from its
upright size, and the request, in stored pixels, has width and height swapped back. Pixels
then differ slightly from a full decode (measured on 1600×1200 synthetic photos at 224×288:
0.17 grey levels on average, 2 at most; see docs/methods.md#decoding-images-once); it is part
of the decode policy, so it applies with the cache on and off alike, and
``reduced_jpeg_decode: false`` decodes every pixel as CLIP-ReID's loader does.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..backbone_specs import PreprocessConfig
from ..device import available_cpus
from ..params import exif_orientation_for
from ..progress import tqdm
from ..runs import decode_cache_dir
from .image_files import check_orientation, open_file, oriented_rgb, turns_sideways
from .transforms import AugmentConfig, build_transform, resize_step

__all__ = ["DRAFT_MARGIN", "DecodeGeometry", "decode_image", "decode_resized", "DecodeCache",
           "CacheReport", "ImageSource", "image_source", "orientation_of"]

#: Reduced-scale decoding keeps at least this factor above the resized size, so the bicubic
#: resize that follows still shrinks at least 2x (its low-pass filter then dominates the DCT
#: scaling's box-like filter: 0.17 grey levels apart on average, 2 at most, on 1600x1200
#: synthetic photos at 224x288; a margin of 1 gives 0.25-0.36 and 5).
DRAFT_MARGIN = 2

#: Bump when decode_resized changes what it returns: old cache entries are then never read.
DECODE_VERSION = 1


@dataclass(frozen=True)
class DecodeGeometry:
    """Everything that decides the pixels of a decoded, resized image."""

    height: int
    width: int
    resize_mode: str
    interpolation: str
    mean: tuple[float, float, float]  # the letterbox fill colour is the normalisation mean
    reduced_jpeg_decode: bool = True
    #: the EXIF orientation policy, ``exif`` or ``ignore`` (:mod:`.image_files`)
    orientation: str = "ignore"

    def __post_init__(self):
        check_orientation(self.orientation)

    @classmethod
    def from_preprocess(cls, preprocess: PreprocessConfig, reduced_jpeg_decode: bool = True,
                        orientation: str = "ignore") -> "DecodeGeometry":
        return cls(int(preprocess.image_size[0]), int(preprocess.image_size[1]),
                   preprocess.resize_mode, preprocess.interpolation,
                   tuple(float(m) for m in preprocess.mean), bool(reduced_jpeg_decode),
                   orientation)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def key(self) -> str:
        """A folder name that changes with every field (and with :data:`DECODE_VERSION`)."""
        mean = ",".join(f"{m:.6f}" for m in self.mean)
        text = (f"v{DECODE_VERSION}|{self.height}x{self.width}|{self.resize_mode}|"
                f"{self.interpolation}|{mean}|reduced={self.reduced_jpeg_decode}|"
                f"orientation={self.orientation}")
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return f"{self.height}x{self.width}-{self.resize_mode}-{self.orientation}-{digest}"

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is resized to before any padding."""
        if self.resize_mode == "pad":
            scale = min(self.width / width, self.height / height)
            return max(1, round(width * scale)), max(1, round(height * scale))
        return self.width, self.height

    def preprocess(self) -> PreprocessConfig:
        """The part of a preprocessing config that the resize step reads."""
        return PreprocessConfig(image_size=(self.height, self.width), mean=self.mean,
                                std=(1.0, 1.0, 1.0), resize_mode=self.resize_mode,
                                interpolation=self.interpolation)


def decode_image(path: str | os.PathLike, geometry: DecodeGeometry) -> Image.Image:
    """The file at ``path`` decoded as ``geometry``'s policies say, before the resize: turned
    by its EXIF orientation or not, and a JPEG at reduced scale when at least
    :data:`DRAFT_MARGIN` x the resized size remains; RGB."""
    with open_file(path) as im:
        if geometry.reduced_jpeg_decode and im.format == "JPEG":
            sideways = turns_sideways(im, geometry.orientation)
            w, h = im.size
            # the resized size of the picture as it will be turned (upright size for a photo
            # turned by 90 degrees), then back to the stored pixels the draft reduces
            w, h = geometry.resized_size(*((h, w) if sideways else (w, h)))
            if sideways:
                w, h = h, w
            # PIL picks the largest DCT reduction (1/2, 1/4, 1/8) whose result is still at
            # least the requested size; it does nothing when no reduction qualifies
            im.draft("RGB", (w * DRAFT_MARGIN, h * DRAFT_MARGIN))
        return oriented_rgb(im, geometry.orientation)


def decode_resized(path: str | os.PathLike, geometry: DecodeGeometry) -> np.ndarray:
    """The file at ``path`` decoded (:func:`decode_image`) and resized to ``geometry``: uint8
    ``[height, width, 3]``."""
    resized = resize_step(geometry.preprocess())(decode_image(path, geometry))
    out = np.asarray(resized, dtype=np.uint8)
    if out.shape != geometry.shape:  # pragma: no cover - resize_step's contract
        raise AssertionError(f"{path}: resized to {out.shape}, expected {geometry.shape}")
    return out


@dataclass
class CacheReport:
    """What :meth:`DecodeCache.prepare` did: images seen, built now, seconds, bytes on disk."""

    images: int
    built: int
    seconds: float
    bytes: int

    def describe(self) -> str:
        reused = self.images - self.built
        return (f"decoded-image cache: {self.built} images decoded now, {reused} reused, "
                f"{self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s")


class DecodeCache:
    """:func:`decode_resized` memoised on disk under ``root/<geometry key>/``."""

    def __init__(self, geometry: DecodeGeometry, root: str | os.PathLike | None = None):
        self.geometry = geometry
        self.root = Path(root) if root is not None else decode_cache_dir()
        self.folder = self.root / geometry.key

    def __repr__(self) -> str:
        return f"DecodeCache({self.folder})"

    def entry_path(self, path: str | os.PathLike) -> Path:
        """The entry of ``path`` as it is now (its absolute path, size and mtime)."""
        st = os.stat(path)
        text = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
        digest = hashlib.sha256(text.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest[2:34]}.npy"

    def _read(self, entry: Path) -> np.ndarray | None:
        try:
            # a plain read (193 KB at 224x288) through the OS page cache, which every process
            # shares; measured faster than a memory map that is copied into PIL at once
            array = np.load(entry, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):  # damaged by something else: decode again
            return None
        if array.shape != self.geometry.shape or array.dtype != np.uint8:
            return None
        return array

    def _write(self, entry: Path, array: np.ndarray) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # a name no other process or thread uses, in the same folder: rename is then atomic
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, entry)
        finally:
            if tmp.exists():
                tmp.unlink()

    def get(self, path: str | os.PathLike) -> np.ndarray:
        """The decoded, resized image of ``path``; decoded and stored on first use."""
        entry = self.entry_path(path)
        array = self._read(entry)
        if array is None:
            array = decode_resized(path, self.geometry)
            try:
                self._write(entry, array)
            except OSError as exc:  # a full or read-only disk slows the run, never stops it
                warnings.warn(f"decoded-image cache {self.folder}: could not store {path} "
                              f"({exc}); the image is used without caching it. Free space "
                              f"there, or set decode_cache: false", stacklevel=2)
        return array

    def _ensure(self, path: str) -> bool:
        entry = self.entry_path(path)
        if self._read(entry) is not None:
            return False
        self._write(entry, decode_resized(path, self.geometry))
        return True

    def prepare(self, paths: Sequence[str], workers: int | None = None,
                progress: bool = True) -> CacheReport:
        """Decode every image of ``paths`` that has no entry yet, ``workers`` threads at a time
        (default: every available core; PIL releases the GIL while it decodes and resizes)."""
        started = time.perf_counter()
        unique = list(dict.fromkeys(map(str, paths)))
        workers = max(1, workers or available_cpus())
        built = 0
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for was_built in tqdm(pool.map(self._ensure, unique), total=len(unique),
                                  desc="decode images once", leave=False,
                                  disable=not progress):
                built += int(was_built)
        return CacheReport(images=len(unique), built=built,
                           seconds=time.perf_counter() - started,
                           bytes=sum(self.entry_path(p).stat().st_size for p in unique))


class ImageSource:
    """``path -> normalised tensor``: decode + resize (through a :class:`DecodeCache` when
    given), then the tensor steps of ``build_transform(..., resized=True)``. Picklable, so
    data-loader worker processes call it directly."""

    def __init__(self, preprocess: PreprocessConfig, train: bool = False,
                 augment: AugmentConfig | None = None, cache: bool = True,
                 reduced_jpeg_decode: bool = True,
                 cache_root: str | os.PathLike | None = None, orientation: str = "ignore"):
        self.geometry = DecodeGeometry.from_preprocess(preprocess, reduced_jpeg_decode,
                                                       orientation)
        self.transform = build_transform(preprocess, train=train, augment=augment, resized=True)
        self.cache = DecodeCache(self.geometry, cache_root) if cache else None

    def decode(self, path: str | os.PathLike) -> np.ndarray:
        if self.cache is not None:
            return self.cache.get(path)
        return decode_resized(path, self.geometry)

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        return self.transform(Image.fromarray(np.asarray(self.decode(path))))

    def prepare(self, paths: Sequence[str], progress: bool = True) -> CacheReport | None:
        """Fill the cache for ``paths`` in parallel (nothing to do without a cache)."""
        if self.cache is None:
            return None
        return self.cache.prepare(paths, progress=progress)

    def __repr__(self) -> str:
        # the feature cache keys on this text: it names what decides the pixels (not whether
        # they came through the cache, which gives the same pixels)
        return f"ImageSource(decode={self.geometry.key}, transform={self.transform!r})"


def orientation_of(params: Mapping) -> str:
    """The concrete EXIF orientation policy of a run's ``params``: the resolved
    ``exif_orientation``; ``auto`` (parameters not passed through ``resolve_params``) resolved
    by their ``dataset`` and ``stage``; ``ignore`` when absent: a run recorded before the
    parameter existed read every image as stored."""
    value = params.get("exif_orientation") or "ignore"
    return exif_orientation_for(value, params.get("dataset"), params.get("stage"))


def image_source(preprocess: PreprocessConfig, params: Mapping, train: bool = False,
                 augment: AugmentConfig | None = None) -> ImageSource:
    """The image source a run's ``params`` ask for (``decode_cache``, ``reduced_jpeg_decode``;
    both default on; ``exif_orientation``, :func:`orientation_of`) for a backbone's
    ``preprocess`` config."""
    return ImageSource(preprocess, train=train, augment=augment,
                       cache=bool(params.get("decode_cache", True)),
                       reduced_jpeg_decode=bool(params.get("reduced_jpeg_decode", True)),
                       orientation=orientation_of(params))
