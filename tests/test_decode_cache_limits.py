"""The decoded-image cache's limits (``data/images.py``): it never stops a run, and it does not
only grow.

A full disk (or a quota, or a read-only file system) while ``prepare`` fills the cache warns
once and leaves the run uncached with the same pixels; ``decode_cache_max_gb`` caps the cache
folder by evicting the least recently used entries (never the running ``prepare``'s own), safely
beside readers and other evicting processes; ``python -m handclip_nb.data.images --cache-info``
names the dead entries (their source file is gone or has changed) and ``--clear`` removes them
or everything.
"""
import errno
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handclip_nb.backbone_specs import PreprocessConfig
from handclip_nb.data import images as images_module
from handclip_nb.data.images import (TOUCH_AFTER_S, DecodeCache, DecodeGeometry, ImageSource,
                                     decode_resized, entry_source, image_source, main)
from handclip_nb.params import SCHEMA, ParamError, resolve_params

REPO = Path(__file__).resolve().parents[1]

#: (height, width) of the entries: small, so a cap of a few entries is a few tens of kB.
INPUT = (48, 64)
#: A day ago: entries this old count as not used lately (older than TOUCH_AFTER_S).
DAY = 86_400


@pytest.fixture()
def photos(tmp_path) -> list[Path]:
    """Eight 60x80 noise PNGs with names of one length (so their entries have one size)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    out = []
    for i in range(8):
        path = folder / f"hand_{i}.png"
        pixels = np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        out.append(path)
    return out


def _geometry(size=INPUT) -> DecodeGeometry:
    return DecodeGeometry.from_preprocess(PreprocessConfig(image_size=size))


def _our_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "decoded-image cache" in str(w.message)]


def _age(entry: Path, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    os.utime(entry, (then, then))


# --- 1. a full disk never stops a run -----------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS],
                         ids=["ENOSPC", "EDQUOT", "EROFS"])
def test_a_full_disk_in_prepare_warns_once_and_the_run_goes_on_uncached(photos, tmp_path,
                                                                         monkeypatch, code):
    """Guards against ``prepare`` (run before every training and feature extraction) raising
    when the cache cannot be written, and against a warning per image, per thread or per new
    image source: one warning names the folder, the error and the fixes; the pixels are those
    of an uncached run."""
    root = tmp_path / "cache"
    message = os.strerror(code)

    def save_then_fail(file, array, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise OSError(code, message)

    preprocess = PreprocessConfig(image_size=INPUT)
    paths = [str(p) for p in photos]
    monkeypatch.setattr(np, "save", save_then_fail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = ImageSource(preprocess, cache=True, cache_root=root)
        report = source.cache.prepare(paths, workers=4, progress=False)
        served = [source(p) for p in paths]  # the loader's reads: uncached, no more warnings
        again = ImageSource(preprocess, cache=True, cache_root=root)  # e.g. the next epoch's
        again.prepare(paths, progress=False)
        served_again = [again(p) for p in paths]
    monkeypatch.undo()
    ours = _our_warnings(caught)
    assert len(ours) == 1, ours
    assert str(root) in ours[0] and message in ours[0]
    for fix in ("Free space", "decode_cache_max_gb", "decode_cache: false"):
        assert fix in ours[0]
    assert (report.images, report.built, report.uncached) == (len(paths), 0, len(paths))
    assert "not cached" in report.describe()
    assert not source.cache.writable
    uncached = ImageSource(preprocess, cache=False)
    for path, a, b in zip(paths, served, served_again):
        expected = uncached(path)
        assert torch.equal(a, expected) and torch.equal(b, expected), path
    assert [p for p in root.rglob("*") if p.is_file()] == []  # no entry, no temp file left


# --- 2. a size cap with least-recently-used eviction --------------------------------------------


def test_a_prepare_over_the_cap_evicts_the_least_recently_used_entries(photos, tmp_path):
    """Guards against eviction by anything but last use (creation order, name, size), against
    reads that do not count as use, and against evicting less than down to 90 % of the cap.
    Six entries, a day old, are ranked by age against their names' order (an eviction by name
    would pick others); the two oldest are read again. A prepare that adds a seventh entry to a
    cap of 5.5 entries evicts the three oldest of the rest and keeps four (90 % is 4.95)."""
    geometry = _geometry()
    root = tmp_path / "cache"
    unlimited = DecodeCache(geometry, root)
    for path in photos[:6]:
        unlimited.get(path)
    entry = {p: unlimited.entry_path(p) for p in photos[:7]}
    by_age = sorted(photos[:6], key=lambda p: str(entry[p]), reverse=True)  # oldest first
    for rank, path in enumerate(by_age):
        _age(entry[path], DAY - 60 * rank)
    for path in by_age[:2]:  # read again now: used lately, whatever their age
        assert np.array_equal(unlimited.get(path), decode_resized(path, geometry))
        assert time.time() - entry[path].stat().st_mtime < TOUCH_AFTER_S
    sizes = {p: entry[p].stat().st_size for p in photos[:6]}
    capped = DecodeCache(geometry, root, max_gb=5.5 * max(sizes.values()) / 1e9)
    report = capped.prepare([str(photos[6])], workers=1, progress=False)
    kept = {p for p in photos[:7] if entry[p].is_file()}
    assert kept == {by_age[0], by_age[1], by_age[5], photos[6]}
    evicted = by_age[2:5]
    assert (report.built, report.evicted) == (1, 3)
    assert report.evicted_bytes == sum(sizes[p] for p in evicted)
    assert "3 least recently used entries evicted" in report.describe()
    # under the cap now: a prepare that stores nothing new evicts nothing
    assert capped.prepare([str(p) for p in kept], progress=False).evicted == 0


def test_a_run_never_evicts_its_own_entries(photos, tmp_path):
    """Guards against a cap smaller than one run's images evicting the entries that run is
    about to read (each epoch would decode them all again): the older entries go, the run's
    own stay, and one warning says the cap is too small."""
    geometry = _geometry()
    root = tmp_path / "cache"
    unlimited = DecodeCache(geometry, root)
    for path in photos[:2]:
        unlimited.get(path)
        _age(unlimited.entry_path(path), DAY)
    size = unlimited.entry_path(photos[0]).stat().st_size
    capped = DecodeCache(geometry, root, max_gb=1.5 * size / 1e9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = capped.prepare([str(p) for p in photos[2:5]], progress=False)
    assert [p.name for p in photos if capped.entry_path(p).is_file()] == \
        [p.name for p in photos[2:5]]
    assert report.evicted == 2
    ours = _our_warnings(caught)
    assert len(ours) == 1 and "above decode_cache_max_gb" in ours[0]


def test_a_reader_whose_entry_is_evicted_decodes_again(photos, tmp_path, monkeypatch):
    """Guards against a reader crashing when a run in another process evicts its entry: one
    that has the file open reads it whole (POSIX unlink), one that looks it up just before the
    unlink decodes again (and stores the entry anew)."""
    geometry = _geometry()
    cache = DecodeCache(geometry, tmp_path / "cache")
    expected = decode_resized(photos[0], geometry)
    cache.get(photos[0])
    entry = cache.entry_path(photos[0])
    with open(entry, "rb") as held:
        os.unlink(entry)  # what an evicting process does
        assert np.array_equal(np.load(held), expected)
    cache.get(photos[0])
    locate = cache._locate

    def evicted_after_lookup(path):
        found = locate(path)
        found[0].unlink(missing_ok=True)
        return found

    monkeypatch.setattr(cache, "_locate", evicted_after_lookup)
    assert np.array_equal(cache.get(photos[0]), expected)
    monkeypatch.undo()
    assert np.array_equal(np.load(entry), expected)  # built again


def test_two_processes_evicting_at_once_do_not_crash(photos, tmp_path, monkeypatch):
    """Guards against eviction failing on files another process evicted between the scan and
    the unlink: they are gone all the same; the cache ends under its cap."""
    geometry = _geometry()
    root = tmp_path / "cache"
    unlimited = DecodeCache(geometry, root)
    for i, path in enumerate(photos[:6]):
        unlimited.get(path)
        _age(unlimited.entry_path(path), DAY - 60 * i)
    size = max(unlimited.entry_path(p).stat().st_size for p in photos[:6])
    real_scan = images_module._scan

    def scan_then_the_other_process_evicts(folder, temps=False):
        files = real_scan(folder, temps)
        for f in sorted(files, key=lambda f: f.mtime)[:2]:  # the two oldest, as it would
            os.unlink(f.path)
        return files

    monkeypatch.setattr(images_module, "_scan", scan_then_the_other_process_evicts)
    capped = DecodeCache(geometry, root, max_gb=3.5 * size / 1e9)
    removed, freed = capped.evict()
    monkeypatch.undo()
    assert (removed, freed) == (1, size)  # entry 2; entries 0 and 1 were the other's
    assert [i for i in range(6) if unlimited.entry_path(photos[i]).is_file()] == [3, 4, 5]


# --- 3. --cache-info and --clear ----------------------------------------------------------------


def _two_geometries(photos, root):
    """Entries of photos 0-3 at INPUT and of photos 0-1 at another input size."""
    small, other = DecodeCache(_geometry(), root), DecodeCache(_geometry((32, 40)), root)
    for path in photos[:4]:
        small.get(path)
    for path in photos[:2]:
        other.get(path)
    return small, other


def test_cache_info_names_the_dead_entries(photos, tmp_path):
    """Guards against an info that cannot tell an entry's source (hashed names) or that calls
    an entry dead while its source is unchanged: a deleted source photo and a rewritten one are
    dead, the others are not, per geometry folder; through ``python -m``."""
    root = tmp_path / "cache"
    small, other = _two_geometries(photos, root)
    assert entry_source(small.entry_path(photos[0]))["source"] == str(photos[0])
    photos[1].unlink()  # its two entries are dead
    later = time.time() + 5
    os.utime(photos[2], (later, later))  # rewritten: its entry's key no longer matches
    done = subprocess.run([sys.executable, "-m", "handclip_nb.data.images", "--cache-info",
                           "--root", str(root)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    total = sum(f.stat().st_size for f in root.rglob("*.npy"))
    assert f"decoded-image cache {root}: 6 entries, {total / 1e6:.1f} MB in 2 geometries" in out
    assert f"{small.folder.name}: 4 entries" in out and f"{other.folder.name}: 2 entries" in out
    assert "4 entries, " in out.split(small.folder.name)[1].split("\n")[0]
    assert out.split(small.folder.name)[1].split("\n")[0].endswith("2 dead")
    assert out.split(other.folder.name)[1].split("\n")[0].endswith("1 dead")
    assert "dead entries (source file gone or changed, never read again): 3" in out
    assert out.count(f"{photos[1]} (missing)") == 2 and out.count(f"{photos[2]} (changed)") == 1
    assert str(photos[0]) not in out and str(photos[3]) not in out


def test_clear_dead_then_clear_everything(photos, tmp_path, capsys):
    """Guards against ``--clear --dead`` removing live entries (or missing dead ones) and
    against ``--clear`` leaving entries or deleting anything that is not the cache's."""
    root = tmp_path / "cache"
    small, other = _two_geometries(photos, root)
    entries = [small.entry_path(p) for p in photos[:4]]
    entries += [other.entry_path(p) for p in photos[:2]]
    photos[1].unlink()
    foreign = root / "notes.txt"
    foreign.write_text("not an entry")
    assert main(["--clear", "--dead", "--root", str(root)]) == 0
    assert "removed 2 dead entries" in capsys.readouterr().out
    assert [e.is_file() for e in entries] == [True, False, True, True, True, False]
    assert main(["--clear", "--root", str(root)]) == 0
    assert "removed 4 entries" in capsys.readouterr().out
    assert list(root.rglob("*.npy")) == [] and foreign.read_text() == "not an entry"
    assert [p.name for p in root.iterdir()] == ["notes.txt"]  # the empty folders went too
    with pytest.raises(SystemExit):
        main(["--cache-info", "--dead", "--root", str(root)])  # --dead only with --clear
    assert "--dead goes with --clear" in capsys.readouterr().err


# --- 4. the parameter ---------------------------------------------------------------------------


def test_decode_cache_max_gb_reaches_the_cache(workbench_home):
    """Guards the documented default (20 GB), None = no cap, a non-positive cap refused, and
    ``image_source`` passing the run's value (the schema's default for run folders written
    before the parameter existed)."""
    assert SCHEMA["decode_cache_max_gb"].default == 20.0
    assert resolve_params(stage="stage2").decode_cache_max_gb == 20.0
    assert resolve_params({"decode_cache_max_gb": None}, stage="search").decode_cache_max_gb \
        is None
    for bad in (0, -1):
        with pytest.raises(ParamError, match="'decode_cache_max_gb': must be >"):
            resolve_params({"decode_cache_max_gb": bad}, stage="stage0")
    preprocess = PreprocessConfig(image_size=INPUT)
    assert image_source(preprocess, {}).cache.max_bytes == 20 * 10**9
    assert image_source(preprocess, {"decode_cache_max_gb": 0.5}).cache.max_bytes == 5 * 10**8
    assert image_source(preprocess, {"decode_cache_max_gb": None}).cache.max_bytes is None
