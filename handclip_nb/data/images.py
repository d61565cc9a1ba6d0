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

The cache never stops a run and does not only grow. A write that fails (full disk, quota,
read-only file system) warns once per process and cache folder, and the run goes on without
storing entries: the same pixels, decoded every time. ``decode_cache_max_gb`` caps the whole
cache folder: after a :meth:`DecodeCache.prepare` that stored new entries, the least recently
used entries (those of the running ``prepare`` excepted) are unlinked until the cache holds at
most 90 % of the cap. An entry's modification time is its use clock: a read sets it to now when
it is older than :data:`TOUCH_AFTER_S` (one ``utime`` on the open file, at most that often). Each
deletion unlinks one whole file, so a reader that has the file open still reads it (POSIX), a
reader that comes later finds no entry and decodes again, and two processes evicting at once
only find some files already gone. Each entry file holds two ``.npy`` arrays one after the other
(``np.save`` twice into one file, as numpy documents): the pixels, which ``np.load`` returns,
then the source record, the UTF-8 JSON ``{"source", "size", "mtime_ns"}`` of the file it was
decoded from. One file per entry keeps the write atomic and the eviction a single unlink, with
no index to keep consistent; the record lets ``python -m handclip_nb.data.images --cache-info``
tell the dead entries (their source is gone or has changed since, so no run can read them
again) and ``--clear --dead`` remove them.

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

import argparse
import hashlib
import json
import os
import sys
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
from ..params import SCHEMA, exif_orientation_for
from ..progress import tqdm
from ..runs import decode_cache_dir
from .image_files import check_orientation, open_file, oriented_rgb, turns_sideways
from .transforms import AugmentConfig, build_transform, resize_step

__all__ = ["DRAFT_MARGIN", "DecodeGeometry", "decode_image", "decode_resized", "DecodeCache",
           "CacheReport", "CacheFile", "scan_cache", "entry_source", "cache_info",
           "describe_cache_info", "clear_cache", "main", "ImageSource", "image_source",
           "orientation_of"]

#: Reduced-scale decoding keeps at least this factor above the resized size, so the bicubic
#: resize that follows still shrinks at least 2x (its low-pass filter then dominates the DCT
#: scaling's box-like filter: 0.17 grey levels apart on average, 2 at most, on 1600x1200
#: synthetic photos at 224x288; a margin of 1 gives 0.25-0.36 and 5).
DRAFT_MARGIN = 2

#: Bump when decode_resized changes what it returns: old cache entries are then never read.
DECODE_VERSION = 1

#: A read marks an entry as used (sets its modification time, the eviction's use clock) when
#: the time is older than this many seconds: one cheap ``utime`` at most this often per entry.
TOUCH_AFTER_S = 600
#: Eviction stops when the cache holds at most this share of its cap, so that the next runs do
#: not evict again for a few entries.
EVICT_TO = 0.9
#: A temp file this old is a leftover of a killed writer (a write takes milliseconds).
STALE_TEMP_S = 3600

#: Cache folders (and the kind of problem) this process has warned about: a full disk warns
#: once per process, not once per image, epoch or data loader.
_WARNED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(root: Path, kind: str, message: str) -> None:
    with _WARNED_LOCK:
        if (str(root), kind) in _WARNED:
            return
        _WARNED.add((str(root), kind))
    warnings.warn(message, stacklevel=3)


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
    """What :meth:`DecodeCache.prepare` did: images seen, built now, seconds, bytes on disk;
    images left without an entry (the cache could not store them), and the least recently used
    entries evicted to stay under the cap (count and bytes)."""

    images: int
    built: int
    seconds: float
    bytes: int
    uncached: int = 0
    evicted: int = 0
    evicted_bytes: int = 0

    def describe(self) -> str:
        reused = self.images - self.built - self.uncached
        text = (f"decoded-image cache: {self.built} images decoded now, {reused} reused, "
                f"{self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s")
        if self.uncached:
            text += f"; {self.uncached} not cached (decoded every time)"
        if self.evicted:
            text += (f"; {self.evicted} least recently used entries evicted "
                     f"({self.evicted_bytes / 2**20:.1f} MiB)")
        return text


@dataclass(frozen=True)
class CacheFile:
    """One entry file of a cache folder: its path, geometry folder, bytes and use time."""

    path: Path
    geometry: str
    size: int
    mtime: float


def _subfolders(folder: str | os.PathLike) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):  # removed meanwhile (--clear): nothing
        return []


def _scan(root: str | os.PathLike, temps: bool = False) -> list[CacheFile]:
    """The entry files (``temps``: the temp files instead) under ``root/<geometry>/<xx>/``;
    files that vanish while it looks are left out."""
    out = []
    for geometry in _subfolders(root):
        for shard in _subfolders(geometry.path):
            try:
                with os.scandir(shard.path) as it:
                    files = list(it)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for f in files:
                is_temp = f.name.startswith(".") and f.name.endswith(".tmp")
                if is_temp != temps or (not temps and (f.name.startswith(".")
                                                       or not f.name.endswith(".npy"))):
                    continue
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out.append(CacheFile(Path(f.path), geometry.name, st.st_size, st.st_mtime))
    return out


def scan_cache(root: str | os.PathLike | None = None) -> list[CacheFile]:
    """Every entry file of the cache folder ``root`` (default ``outputs/.decode_cache``)."""
    return _scan(decode_cache_dir() if root is None else root)


def entry_source(entry: str | os.PathLike) -> dict | None:
    """The source record stored after an entry's pixels (``source``, ``size``, ``mtime_ns``);
    None for an entry without one (written before records existed, or damaged)."""
    try:
        with open(entry, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            f.seek(int(np.prod(shape)) * dtype.itemsize, os.SEEK_CUR)
            raw = np.load(f, allow_pickle=False)
        record = json.loads(raw.tobytes().decode("utf-8"))
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(record, dict) or not {"source", "size", "mtime_ns"} <= set(record):
        return None
    return record


def _source_state(record: dict | None) -> str:
    """``live``, ``missing`` (the source file is gone), ``changed`` (it has another size or
    modification time: the entry's key no longer matches) or ``unknown`` (no record)."""
    if record is None:
        return "unknown"
    try:
        st = os.stat(record["source"])
    except FileNotFoundError:
        return "missing"
    except OSError:  # unreadable from here (permissions): not known to be dead
        return "unknown"
    same = st.st_size == record["size"] and st.st_mtime_ns == record["mtime_ns"]
    return "live" if same else "changed"


class DecodeCache:
    """:func:`decode_resized` memoised on disk under ``root/<geometry key>/``; with ``max_gb``,
    :meth:`prepare` keeps the whole ``root`` under that many GB (10^9 bytes) by evicting the
    least recently used entries."""

    def __init__(self, geometry: DecodeGeometry, root: str | os.PathLike | None = None,
                 max_gb: float | None = None):
        self.geometry = geometry
        self.root = Path(root) if root is not None else decode_cache_dir()
        self.folder = self.root / geometry.key
        if max_gb is not None and not max_gb > 0:
            raise ValueError(f"max_gb must be > 0 or None (no cap), got {max_gb!r}")
        self.max_bytes = None if max_gb is None else int(max_gb * 1e9)
        #: False after a write failed: the cache then only serves the entries it has
        self.writable = True

    def __repr__(self) -> str:
        return f"DecodeCache({self.folder})"

    def _locate(self, path: str | os.PathLike) -> tuple[Path, dict]:
        """The entry of ``path`` as it is now, and the source record stored with it."""
        st = os.stat(path)
        source = os.path.abspath(path)
        text = f"{source}\0{st.st_size}\0{st.st_mtime_ns}"
        digest = hashlib.sha256(text.encode()).hexdigest()
        record = {"source": source, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return self.folder / digest[:2] / f"{digest[2:34]}.npy", record

    def entry_path(self, path: str | os.PathLike) -> Path:
        """The entry of ``path`` as it is now (its absolute path, size and mtime)."""
        return self._locate(path)[0]

    def _read(self, entry: Path) -> np.ndarray | None:
        try:
            # a plain read (193 KB at 224x288) through the OS page cache, which every process
            # shares; measured faster than a memory map that is copied into PIL at once
            with open(entry, "rb") as f:
                array = np.load(f, allow_pickle=False)
                if array.shape != self.geometry.shape or array.dtype != np.uint8:
                    return None
                _touch(f.fileno(), entry)
        except FileNotFoundError:  # not built yet, or evicted: decode again
            return None
        except (ValueError, OSError, EOFError):  # damaged by something else: decode again
            return None
        return array

    def _write(self, entry: Path, array: np.ndarray, record: dict) -> None:
        # a name no other process or thread uses, in the same folder: rename is then atomic
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        for attempt in range(2):
            entry.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    np.save(f, array, allow_pickle=False)
                    np.save(f, np.frombuffer(json.dumps(record).encode(), np.uint8),
                            allow_pickle=False)
                os.replace(tmp, entry)
                return
            except FileNotFoundError:  # the folder was removed meanwhile (--clear): once more
                if attempt:
                    raise
            finally:
                if tmp.exists():
                    tmp.unlink()

    def _store(self, entry: Path, array: np.ndarray, record: dict) -> bool:
        """Write an entry; a failed write (a full disk, a quota, a read-only file system) warns
        once and switches storing off for this cache, so the run goes on uncached."""
        if not self.writable:
            return False
        try:
            self._write(entry, array, record)
        except OSError as exc:  # a full or read-only disk slows the run, never stops it
            self.writable = False
            _warn_once(self.root, "write",
                       f"decoded-image cache {self.root}: cannot store entries ({exc}); this "
                       f"process goes on without caching new images (the same pixels, decoded "
                       f"every time: identical results, slower). Free space there, lower "
                       f"decode_cache_max_gb, or set decode_cache: false")
            return False
        return True

    def get(self, path: str | os.PathLike) -> np.ndarray:
        """The decoded, resized image of ``path``; decoded and stored on first use."""
        entry, record = self._locate(path)
        array = self._read(entry)
        if array is None:
            array = decode_resized(path, self.geometry)
            self._store(entry, array, record)
        return array

    def _ensure(self, path: str) -> bool:
        entry, record = self._locate(path)
        if self._read(entry) is not None or not self.writable:
            return False  # uncached: the loader decodes it (decoding it here would be lost)
        return self._store(entry, decode_resized(path, self.geometry), record)

    def prepare(self, paths: Sequence[str], workers: int | None = None,
                progress: bool = True) -> CacheReport:
        """Decode every image of ``paths`` that has no entry yet, ``workers`` threads at a time
        (default: every available core; PIL releases the GIL while it decodes and resizes).
        A write that fails warns once and leaves the rest uncached; when entries were stored
        and the cache is over its cap, the least recently used other entries are evicted."""
        started = time.perf_counter()
        unique = list(dict.fromkeys(map(str, paths)))
        workers = max(1, workers or available_cpus())
        built = 0
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for was_built in tqdm(pool.map(self._ensure, unique), total=len(unique),
                                  desc="decode images once", leave=False,
                                  disable=not progress):
                built += int(was_built)
        entries = [self.entry_path(p) for p in unique]
        sizes = []
        for entry in entries:
            try:
                sizes.append(entry.stat().st_size)
            except FileNotFoundError:  # not stored (the disk is full), or evicted meanwhile
                sizes.append(None)
        evicted = (0, 0)
        if built and self.max_bytes is not None:
            evicted = self.evict(keep=entries)
        return CacheReport(images=len(unique), built=built,
                           seconds=time.perf_counter() - started,
                           bytes=sum(s for s in sizes if s is not None),
                           uncached=sum(s is None for s in sizes),
                           evicted=evicted[0], evicted_bytes=evicted[1])

    def evict(self, keep: Sequence[str | os.PathLike] = ()) -> tuple[int, int]:
        """Unlink the least recently used entries of the whole cache folder (every geometry)
        until it holds at most :data:`EVICT_TO` of the cap, never an entry in ``keep``; returns
        (entries, bytes) this call removed. Safe beside readers and other evicting processes:
        a reader that finds no entry decodes again, a file already gone is skipped."""
        if self.max_bytes is None:
            return 0, 0
        files = _scan(self.root)
        total = sum(f.size for f in files)
        if total <= self.max_bytes:
            return 0, 0
        target = int(self.max_bytes * EVICT_TO)
        keep = {os.path.abspath(k) for k in keep}
        removed = freed = 0
        for f in sorted(files, key=lambda f: (f.mtime, str(f.path))):
            if total <= target:
                break
            if os.path.abspath(f.path) in keep:
                continue
            try:
                os.unlink(f.path)
            except FileNotFoundError:  # another process evicted it first: gone all the same
                total -= f.size
                continue
            except OSError:  # not ours to delete (permissions, read-only): leave it
                continue
            total -= f.size
            removed += 1
            freed += f.size
        if total > self.max_bytes:
            _warn_once(self.root, "cap",
                       f"decoded-image cache {self.root}: {total / 1e9:.2f} GB after eviction, "
                       f"above decode_cache_max_gb ({self.max_bytes / 1e9:g} GB): this run's "
                       f"own images (or files that cannot be deleted) take more. Raise "
                       f"decode_cache_max_gb, or set decode_cache: false")
        return removed, freed


def _touch(fd: int, path: Path) -> None:
    """Mark an open entry as used now (its modification time), unless it was recently."""
    try:
        if time.time() - os.fstat(fd).st_mtime > TOUCH_AFTER_S:
            os.utime(fd if os.utime in os.supports_fd else path)
    except OSError:  # someone else's file, or a read-only cache: the clock just stays
        pass


class ImageSource:
    """``path -> normalised tensor``: decode + resize (through a :class:`DecodeCache` when
    given), then the tensor steps of ``build_transform(..., resized=True)``. Picklable, so
    data-loader worker processes call it directly."""

    def __init__(self, preprocess: PreprocessConfig, train: bool = False,
                 augment: AugmentConfig | None = None, cache: bool = True,
                 reduced_jpeg_decode: bool = True,
                 cache_root: str | os.PathLike | None = None,
                 cache_max_gb: float | None = None, orientation: str = "ignore"):
        self.geometry = DecodeGeometry.from_preprocess(preprocess, reduced_jpeg_decode,
                                                       orientation)
        self.transform = build_transform(preprocess, train=train, augment=augment, resized=True)
        self.cache = DecodeCache(self.geometry, cache_root, cache_max_gb) if cache else None

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
    both default on; ``decode_cache_max_gb``, the schema's default where absent, as in run
    folders written before it existed; ``exif_orientation``, :func:`orientation_of`) for a
    backbone's ``preprocess`` config."""
    max_gb = params.get("decode_cache_max_gb", SCHEMA["decode_cache_max_gb"].default)
    return ImageSource(preprocess, train=train, augment=augment,
                       cache=bool(params.get("decode_cache", True)),
                       reduced_jpeg_decode=bool(params.get("reduced_jpeg_decode", True)),
                       cache_max_gb=None if max_gb is None else float(max_gb),
                       orientation=orientation_of(params))


# ----------------------------------------------------------------------------- command line


def _stale_temps(root: str | os.PathLike) -> list[CacheFile]:
    now = time.time()
    return [f for f in _scan(root, temps=True) if now - f.mtime > STALE_TEMP_S]


def cache_info(root: str | os.PathLike | None = None) -> dict:
    """What the cache folder ``root`` (default ``outputs/.decode_cache``) holds: ``entries``,
    ``bytes``, per geometry folder ``entries``, ``bytes``, ``dead``; the ``dead`` entries
    (``entry``, ``source``, ``state``: ``missing`` or ``changed``, ``bytes``), the entries
    without a source record (``unknown``) and the temp files left by killed writers
    (``stale_temps``)."""
    root = Path(decode_cache_dir() if root is None else root)
    geometries: dict[str, dict] = {}
    dead, unknown = [], 0
    files = _scan(root)
    for f in files:
        g = geometries.setdefault(f.geometry, {"entries": 0, "bytes": 0, "dead": 0})
        g["entries"] += 1
        g["bytes"] += f.size
        record = entry_source(f.path)
        state = _source_state(record)
        if state in ("missing", "changed"):
            g["dead"] += 1
            dead.append({"entry": str(f.path), "source": record["source"], "state": state,
                         "bytes": f.size})
        elif record is None:
            unknown += 1
    return {"root": str(root), "exists": root.is_dir(), "entries": len(files),
            "bytes": sum(f.size for f in files), "geometries": dict(sorted(geometries.items())),
            "dead": sorted(dead, key=lambda d: d["source"]), "unknown": unknown,
            "stale_temps": len(_stale_temps(root))}


def _amount(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def describe_cache_info(info: Mapping, listed: int = 20) -> str:
    """:func:`cache_info` as text: totals, one line per geometry, the dead entries (one line
    each up to ``listed``, else one per source folder)."""
    if not info["exists"]:
        return f"decoded-image cache {info['root']}: no cache folder"
    lines = [f"decoded-image cache {info['root']}: {info['entries']} entries, "
             f"{_amount(info['bytes'])} in {len(info['geometries'])} "
             f"geometr{'y' if len(info['geometries']) == 1 else 'ies'}"]
    for name, g in info["geometries"].items():
        lines.append(f"  {name}: {g['entries']} entries, {_amount(g['bytes'])}, "
                     f"{g['dead']} dead")
    dead = info["dead"]
    lines.append(f"dead entries (source file gone or changed, never read again): {len(dead)}, "
                 f"{_amount(sum(d['bytes'] for d in dead))}"
                 + ("; --clear --dead removes them" if dead else ""))
    if len(dead) <= listed:
        lines += [f"  {d['source']} ({d['state']})" for d in dead]
    else:
        folders: dict[str, list[dict]] = {}
        for d in dead:
            folders.setdefault(os.path.dirname(d["source"]), []).append(d)
        ranked = sorted(folders.items(), key=lambda kv: -sum(d["bytes"] for d in kv[1]))
        for folder, ds in ranked[:listed]:
            lines.append(f"  {folder}/: {len(ds)} entries, "
                         f"{_amount(sum(d['bytes'] for d in ds))}")
        if len(ranked) > listed:
            lines.append(f"  ... and {len(ranked) - listed} more source folders")
    if info["unknown"]:
        lines.append(f"{info['unknown']} entries have no source record (written by an older "
                     f"version): eviction and --clear remove them")
    if info["stale_temps"]:
        lines.append(f"{info['stale_temps']} temp files left by interrupted writes: --clear "
                     f"--dead removes them")
    cap = SCHEMA["decode_cache_max_gb"].default
    lines.append(f"runs keep the cache under decode_cache_max_gb (default {cap:g} GB), "
                 f"evicting the least recently used entries")
    return "\n".join(lines)


def clear_cache(root: str | os.PathLike | None = None, dead_only: bool = False
                ) -> tuple[int, int]:
    """Remove the cache's entry files, or (``dead_only``) only the dead entries and stale temp
    files; returns (entries, bytes) removed. Only files of the cache's layout are deleted (then
    the folders left empty), so a wrong ``root`` loses nothing else; running runs decode again
    what they miss."""
    root = Path(decode_cache_dir() if root is None else root)
    if dead_only:
        doomed = [f for f in _scan(root) if _source_state(entry_source(f.path)) in
                  ("missing", "changed")]
        temps = _stale_temps(root)
    else:
        doomed, temps = _scan(root), []
    removed = freed = 0
    for f in doomed:
        try:
            os.unlink(f.path)
        except FileNotFoundError:  # evicted by a run meanwhile
            continue
        removed += 1
        freed += f.size
    for f in temps:
        try:
            os.unlink(f.path)
        except FileNotFoundError:
            pass
    if not dead_only:
        for geometry in _subfolders(root):
            for shard in _subfolders(geometry.path):
                _rmdir(shard.path)
            _rmdir(geometry.path)
        _rmdir(root)
    return removed, freed


def _rmdir(folder: str | os.PathLike) -> None:
    try:
        os.rmdir(folder)
    except OSError:  # not empty (a run stored an entry meanwhile, or a foreign file): keep it
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m handclip_nb.data.images --cache-info | --clear [--dead] [--root DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m handclip_nb.data.images",
        description="Inspect or clear the decoded-image cache (outputs/.decode_cache).")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--cache-info", action="store_true",
                        help="print its size, entries per geometry and the dead entries")
    action.add_argument("--clear", action="store_true",
                        help="remove every entry (safe at any time: runs decode again)")
    parser.add_argument("--dead", action="store_true",
                        help="with --clear: remove only the dead entries (source file gone or "
                             "changed) and temp files of interrupted writes")
    parser.add_argument("--root", default=None,
                        help="the cache folder (default: outputs/.decode_cache of the project)")
    args = parser.parse_args(argv)
    if args.dead and not args.clear:
        parser.error("--dead goes with --clear (--cache-info lists the dead entries)")
    root = Path(args.root) if args.root else decode_cache_dir()
    if args.cache_info:
        print(describe_cache_info(cache_info(root)))
        return 0
    removed, freed = clear_cache(root, dead_only=args.dead)
    what = "dead entries" if args.dead else "entries"
    print(f"decoded-image cache {root}: removed {removed} {what}, {_amount(freed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
