"""Downloading OpenAI's CLIP checkpoints on first use, as ``clip.load`` does, but safely.

Where from: OpenAI's address (``BackboneSpec.url``, the one ``clip`` uses), verified against
the SHA-256 in that address (``BackboneSpec.sha256``, as ``clip._download`` does). Two
environment variables point elsewhere (a cluster's internal mirror, a loopback server in the
tests):

* ``HANDCLIP_CLIP_MIRROR=<base URL>``: every OpenAI file is fetched from ``<base>/<file name>``
  (``<base>/ViT-B-16.pt``) and must still have OpenAI's SHA-256;
* ``HANDCLIP_CLIP_URL_<NAME>=<URL>[#sha256=<hex>]`` (``<NAME>``: the backbone name in capitals,
  ``-`` as ``_``, e.g. ``HANDCLIP_CLIP_URL_VITB16``): one backbone's file from that URL; without
  the ``#sha256=`` fragment (pip's notation) it must have OpenAI's SHA-256. A file with another
  SHA-256 is not OpenAI's, so it is kept under another name (``ViT-B-16-<sha256[:12]>.pt``): a
  cache never passes it off as OpenAI's weights, and the backbone's name says where its weights
  came from.

``HANDCLIP_OFFLINE=1`` turns every download off (for cluster nodes without a network), as the
``download: false`` parameter does for one run.

How: the file is streamed into a unique temporary file in the target folder, its length and
SHA-256 checked, and only then renamed onto the final path (``os.replace``): a failed,
truncated or corrupt download leaves nothing at the final path. Jobs that download into one
cache at the same time take turns on an advisory lock (``<file>.lock``, ``fcntl.flock``), so
the checkpoint is downloaded once; correctness does not depend on the lock (each job writes its
own temporary file and the renames are atomic), so a file system without locks is only slower.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Optional

from ..backbone_specs import BackboneSpec
from ..locks import take_turn
from ..progress import tqdm

__all__ = ["OFFLINE_ENV", "MIRROR_ENV", "URL_ENV_PREFIX", "DownloadError", "DownloadSource",
           "offline_from_env", "url_env_name", "download_source", "sha256_of_file",
           "download_verified"]

OFFLINE_ENV = "HANDCLIP_OFFLINE"
MIRROR_ENV = "HANDCLIP_CLIP_MIRROR"
URL_ENV_PREFIX = "HANDCLIP_CLIP_URL_"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCHEMES = ("http", "https", "file")
#: seconds a connection may stay silent (connect, or between two blocks) before we give up
TIMEOUT_S = 60.0
_BLOCK = 1 << 20


class DownloadError(OSError):
    """A download that failed; nothing was left at the final path."""


@dataclass(frozen=True)
class DownloadSource:
    """Where one backbone's checkpoint comes from, what it must hash to, and its file name."""

    url: str
    sha256: str
    file_name: str
    #: the file is OpenAI's release (its SHA-256 is the one in OpenAI's address)
    official: bool
    #: the environment variable that chose ``url``; None for OpenAI's own address
    chosen_by: Optional[str] = None


def offline_from_env() -> bool:
    """True when ``HANDCLIP_OFFLINE`` turns downloads off; a value that is neither a yes nor
    a no is an error (a typo must not start a 335 MB download on a node without a network)."""
    value = os.environ.get(OFFLINE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {OFFLINE_ENV}={os.environ[OFFLINE_ENV]!r}: expected "
                     f"1 (no downloads) or 0 (download weights on first use)")


def url_env_name(spec: BackboneSpec) -> str:
    """``HANDCLIP_CLIP_URL_VITB16`` for ``vitb16``: the variable that overrides one address."""
    return URL_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", spec.name.upper())


def _check_url(url: str, variable: str) -> str:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"environment variable {variable}={url!r}: expected an http://, "
                         f"https:// or file:// address")
    return url


def download_source(spec: BackboneSpec) -> DownloadSource:
    """The address, SHA-256 and file name of ``spec``'s checkpoint (read from the environment
    at every call: a notebook's kernel sees what its job was started with)."""
    if spec.openai_name is None:
        raise ValueError(f"backbone {spec.name!r} has no OpenAI checkpoint to download")
    official_sha, base = spec.sha256, spec.weights_basename
    variable = url_env_name(spec)
    override = os.environ.get(variable, "").strip()
    if override:
        url, _, fragment = override.partition("#")
        sha = official_sha
        if fragment:
            key, _, value = fragment.partition("=")
            if key.strip().lower() != "sha256" or not _SHA256.match(value.strip().lower()):
                raise ValueError(f"environment variable {variable}={override!r}: the part after "
                                 f"'#' must be sha256=<64 hex digits>, e.g. "
                                 f"{url}#sha256={official_sha}")
            sha = value.strip().lower()
        _check_url(url, variable)
        official = sha == official_sha
        stem, suffix = os.path.splitext(base)
        name = base if official else f"{stem}-{sha[:12]}{suffix}"
        return DownloadSource(url, sha, name, official, variable)
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        url = _check_url(mirror.rstrip("/") + "/" + base, MIRROR_ENV)
        return DownloadSource(url, official_sha, base, True, MIRROR_ENV)
    return DownloadSource(spec.url, official_sha, base, True)


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _remove_abandoned_parts(final: Path) -> None:
    """Temporary files of jobs killed mid-download (each is up to the checkpoint's size).
    Called only while holding the lock: every job that locks is then outside its download."""
    for part in final.parent.glob(f".{final.name}.*.part"):
        try:
            part.unlink()
        except OSError:
            pass


def _stream(source: DownloadSource, out, timeout: float) -> tuple[str, int]:
    """Copy ``source.url`` into the open file ``out``; (sha256, bytes) of what was written."""
    h = hashlib.sha256()
    written = 0
    with urllib.request.urlopen(source.url, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.strip().isdigit() else None
        with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"downloading {source.file_name}") as bar:
            while True:
                block = response.read(_BLOCK)
                if not block:
                    break
                out.write(block)
                h.update(block)
                written += len(block)
                bar.update(len(block))
    if expected is not None and written != expected:
        raise DownloadError(f"truncated: received {written} of {expected} bytes")
    return h.hexdigest(), written


def download_verified(source: DownloadSource, directory: Path, *,
                      timeout: float = TIMEOUT_S) -> Path:
    """Download ``source`` into ``directory`` (created if missing) and return the final path.

    The file reaches its final path only after its SHA-256 matched; on any failure the
    temporary file is removed and :class:`DownloadError` says what went wrong. A file that
    another job finished meanwhile is used once it verifies.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the download folder {directory}: {exc}") from exc
    final = directory / source.file_name
    with take_turn(directory / f"{source.file_name}.lock",
                   f"downloading {source.file_name}") as locked:
        if final.is_file():  # another job finished it while this one waited for its turn
            found = sha256_of_file(final)
            if found == source.sha256:
                return final
            raise DownloadError(f"{final} appeared during the download with SHA-256 {found}, "
                                f"not {source.sha256}: it is not the expected file (delete it "
                                f"and run again)")
        if locked:
            _remove_abandoned_parts(final)
        print(f"downloading {source.url} -> {final} (first use)", file=sys.stderr, flush=True)
        # not tempfile.mkstemp: its 0600 would keep a shared cache's file from other users; a
        # unique name created exclusively, with the umask's mode, as clip's own download
        tmp = directory / f".{final.name}.{os.getpid()}-{secrets.token_hex(6)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise DownloadError(f"cannot write into the download folder {directory}: "
                                f"{exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    digest, size = _stream(source, out, timeout)
                except urllib.error.HTTPError as exc:
                    raise DownloadError(f"the server answered HTTP {exc.code} {exc.reason}") from exc
                except urllib.error.URLError as exc:
                    raise DownloadError(f"cannot reach the server: {exc.reason}") from exc
                except (HTTPException, socket.timeout, ConnectionError) as exc:
                    raise DownloadError(f"the transfer broke off: {type(exc).__name__}: "
                                        f"{exc}") from exc
                out.flush()
                os.fsync(out.fileno())
            if digest != source.sha256:
                raise DownloadError(f"the downloaded file ({size} bytes) has SHA-256 {digest}, "
                                    f"not {source.sha256}: it is corrupt or not the expected "
                                    f"file")
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return final
