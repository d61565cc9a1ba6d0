"""Downloading OpenAI's CLIP checkpoints on first use (``models/weight_download.py``).

Against a loopback HTTP server only, never the internet: OpenAI's address is pointed at it
(``clip.clip._MODELS``, from which ``BackboneSpec.url`` and ``.sha256`` are read) or the
environment overrides name it. A good file, a truncated one, a wrong checksum, HTTP errors, the
two offline switches, and jobs downloading into one cache at once.
"""
from __future__ import annotations

import copy
import hashlib
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from handclip_nb.backbone_specs import TINY_VIT_ARCH, get_backbone_spec
from handclip_nb.models import backbones as backbones_mod
from handclip_nb.models import weight_download
from handclip_nb.models.backbones import build_backbone
from handclip_nb.models.weight_download import (DownloadError, DownloadSource, download_source,
                                                download_verified)
from handclip_nb.models.weight_files import WeightsDownloadError, WeightsNotFoundError

clip = backbones_mod.clip
from clip.model import CLIP, convert_weights  # noqa: E402

VITB16 = get_backbone_spec("vitb16")
URL_VAR = "HANDCLIP_CLIP_URL_VITB16"


class LoopbackServer:
    """An HTTP server on 127.0.0.1 serving byte strings; it can cut a body short (with the
    full Content-Length announced) or send it slowly, and logs every request path."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, int, float]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                entry = server.files.get(self.path)
                if entry is None:
                    self.send_error(404, "Not Found")
                    return
                body, sent, pause = entry
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for start in range(0, sent, 1 << 16):
                    self.wfile.write(body[start:min(start + (1 << 16), sent)])
                    if pause:
                        time.sleep(pause)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes, *, truncate_to: int | None = None,
              pause: float = 0.0) -> str:
        self.files[path] = (body, len(body) if truncate_to is None else truncate_to, pause)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = LoopbackServer()
    yield s
    s.close()


@pytest.fixture()
def online(monkeypatch, tmp_path):
    """Downloads on (conftest turns them off), no address overrides, HOME a temp folder, and
    clip's own downloader forbidden (our code must not go through it)."""
    for name in ("HANDCLIP_OFFLINE", "HANDCLIP_CLIP_MIRROR", URL_VAR):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))

    def _no_clip_download(*args, **kwargs):
        raise AssertionError("clip._download must not be used")

    monkeypatch.setattr(clip.clip, "_download", _no_clip_download)
    return home


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _as_openai_release(server, monkeypatch, body: bytes, sha: str | None = None,
                       **serving) -> str:
    """Serve ``body`` in OpenAI's layout (``/clip/models/<sha256>/ViT-B-16.pt``) and point
    clip's model table -- hence ``VITB16.url`` and ``.sha256`` -- at it."""
    sha = _sha(body) if sha is None else sha
    url = server.serve(f"/clip/models/{sha}/ViT-B-16.pt", body, **serving)
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/16", url)
    return url


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """(bytes of a TorchScript archive in OpenAI's release format holding a tiny ViT CLIP, the
    model it was traced from)."""
    torch.manual_seed(21)
    model = CLIP(**TINY_VIT_ARCH).eval()
    path = tmp_path_factory.mktemp("release") / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.randn(1, 3, 224, 224), clip.tokenize(["a hand"])),
                                 check_trace=False)
        torch.jit.save(traced, str(path))
    return path.read_bytes(), model


def _leftovers(folder) -> list[str]:
    """Temporary files of a download (none may survive it, failed or not)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part")) \
        if folder.exists() else []


# ------------------------------------------------------------------------------------------------
# the whole path: a missing checkpoint is downloaded, verified and loaded
# ------------------------------------------------------------------------------------------------


def test_missing_checkpoint_is_downloaded_into_download_root_and_loaded(
        server, online, monkeypatch, tmp_path, tiny_release, capfd):
    body, ref = tiny_release
    _as_openai_release(server, monkeypatch, body)
    dl = tmp_path / "empty" / "clip"  # not there yet: created for the download
    with pytest.warns(UserWarning, match="not the standard"):
        b = build_backbone("vitb16", download_root=dl, image_size=(224, 224))
    path = dl / "ViT-B-16.pt"
    assert b.weights_path == str(path) and path.read_bytes() == body
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file (shared caches)
    assert b.pretrained and b.display_name == "vitb16 (OpenAI CLIP weights)"
    assert _leftovers(dl) == []
    assert not (online / ".cache" / "clip").exists()  # download_root, not clip's cache
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rounded = copy.deepcopy(ref)
    convert_weights(rounded)  # what clip.load makes of a release file: fp16-rounded weights
    with torch.no_grad():
        assert torch.equal(b.encode_image(x).global_embedding, rounded.float().encode_image(x))
    err = capfd.readouterr().err
    assert "downloading" in err and "ViT-B-16.pt" in err  # the line and the progress bar
    # the second build reads the cached file: one request in all
    with pytest.warns(UserWarning, match="not the standard"):
        build_backbone("vitb16", download_root=dl, image_size=(224, 224))
    assert len(server.requests) == 1


def test_without_download_root_the_download_goes_to_clips_cache(server, online, monkeypatch,
                                                                 tiny_release):
    body, _ = tiny_release
    _as_openai_release(server, monkeypatch, body)
    with pytest.warns(UserWarning, match="not the standard"):
        b = build_backbone("vitb16", image_size=(224, 224))
    cached = online / ".cache" / "clip" / "ViT-B-16.pt"
    assert b.weights_path == str(cached) and _sha(cached.read_bytes()) == _sha(body)


# ------------------------------------------------------------------------------------------------
# failures leave nothing at the final path
# ------------------------------------------------------------------------------------------------


def test_truncated_download_leaves_nothing(server, online, monkeypatch, tmp_path):
    body = os.urandom(300_000)
    url = _as_openai_release(server, monkeypatch, body, truncate_to=100_000)
    dl = tmp_path / "dl"
    with pytest.raises(WeightsDownloadError) as exc:
        build_backbone("vitb16", download_root=dl, image_size=(224, 224))
    msg = str(exc.value)
    assert url in msg and "Nothing was kept" in msg
    assert "truncated" in msg or "broke off" in msg
    assert "download=False" in msg and "HANDCLIP_OFFLINE=1" in msg  # how to work offline
    assert isinstance(exc.value, WeightsNotFoundError)  # callers catching the old error still do
    assert not (dl / "ViT-B-16.pt").exists() and _leftovers(dl) == []


def test_wrong_checksum_leaves_nothing_and_names_both_hashes(server, online, monkeypatch,
                                                             tmp_path):
    body = os.urandom(200_000)
    expected = _sha(b"the release this address promises")
    _as_openai_release(server, monkeypatch, body, sha=expected)
    dl = tmp_path / "dl"
    with pytest.raises(WeightsDownloadError) as exc:
        build_backbone("vitb16", download_root=dl, image_size=(224, 224))
    msg = str(exc.value)
    assert expected in msg and _sha(body) in msg and "corrupt" in msg
    assert not (dl / "ViT-B-16.pt").exists() and _leftovers(dl) == []


def test_http_error_and_unreachable_server_are_named(server, online, monkeypatch, tmp_path):
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/16",
                        server.url(f"/clip/models/{'0' * 64}/ViT-B-16.pt"))  # nothing served
    with pytest.raises(WeightsDownloadError, match="HTTP 404"):
        build_backbone("vitb16", download_root=tmp_path / "a", image_size=(224, 224))
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/16",
                        f"http://127.0.0.1:{port}/clip/models/{'0' * 64}/ViT-B-16.pt")
    with pytest.raises(WeightsDownloadError, match="cannot reach the server"):
        build_backbone("vitb16", download_root=tmp_path / "b", image_size=(224, 224))
    assert _leftovers(tmp_path / "a") == [] and _leftovers(tmp_path / "b") == []


def test_a_mirror_must_serve_openais_file(server, online, monkeypatch, tmp_path):
    """HANDCLIP_CLIP_MIRROR changes the address, never the expected SHA-256 (OpenAI's)."""
    body = os.urandom(50_000)
    server.serve("/mirror/ViT-B-16.pt", body)
    monkeypatch.setenv("HANDCLIP_CLIP_MIRROR", server.url("/mirror/"))
    source = download_source(VITB16)
    assert source.url == server.url("/mirror/ViT-B-16.pt") and source.official
    assert source.sha256 == VITB16.sha256 == clip.clip._MODELS["ViT-B/16"].split("/")[-2]
    with pytest.raises(WeightsDownloadError, match=VITB16.sha256):
        build_backbone("vitb16", download_root=tmp_path / "dl", image_size=(224, 224))
    assert not (tmp_path / "dl" / "ViT-B-16.pt").exists()


# ------------------------------------------------------------------------------------------------
# downloads off: the parameter and the environment switch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switch", ["parameter", "environment"])
def test_downloads_off_keep_the_offline_error(switch, server, online, monkeypatch, tmp_path,
                                              tiny_release):
    _as_openai_release(server, monkeypatch, tiny_release[0])
    kwargs = {}
    if switch == "parameter":
        kwargs["download"] = False
    else:
        monkeypatch.setenv("HANDCLIP_OFFLINE", "1")
    dl = tmp_path / "dl"
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as exc:
        build_backbone("vitb16", download_root=dl, image_size=(224, 224), **kwargs)
    assert time.perf_counter() - t0 < 2.0
    assert not isinstance(exc.value, WeightsDownloadError)
    msg = str(exc.value)
    assert "Downloads are off" in msg and str(dl / "ViT-B-16.pt") in msg
    assert "weights=" in msg and "~/.cache/clip" in msg
    assert server.requests == [] and not dl.exists()


def test_a_malformed_offline_switch_is_an_error(online, monkeypatch, tmp_path):
    monkeypatch.setenv("HANDCLIP_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="HANDCLIP_OFFLINE='maybe'"):
        build_backbone("vitb16", download_root=tmp_path, image_size=(224, 224))


def test_the_download_parameter_reaches_the_backbone(server, online, monkeypatch, tmp_path,
                                                     tiny_release):
    from builders import run_params

    from handclip_nb.models.backbones import backbone_from_params
    from handclip_nb.params import NOT_RESULTS, run_identity

    _as_openai_release(server, monkeypatch, tiny_release[0])
    p = run_params("stage0", tmp_path / "run", backbone="vitb16", download=False,
                   download_root=str(tmp_path / "dl"))
    with pytest.raises(WeightsNotFoundError, match="Downloads are off"):
        backbone_from_params(p, device="cpu")
    assert server.requests == []
    assert "download" in NOT_RESULTS  # the same file either way: not part of a run's identity
    assert run_identity(p) == run_identity({**p, "download": True})


# ------------------------------------------------------------------------------------------------
# a per-backbone address with its own SHA-256
# ------------------------------------------------------------------------------------------------


def test_an_address_with_another_sha256_is_kept_and_named_as_not_openais(
        server, online, monkeypatch, tmp_path, tiny_release):
    body, _ = tiny_release
    sha = _sha(body)
    monkeypatch.setenv(URL_VAR, server.serve("/models/my-vit.pt", body) + f"#sha256={sha}")
    dl = tmp_path / "dl"
    with pytest.warns(UserWarning, match="not the standard"):
        b = build_backbone("vitb16", download_root=dl, image_size=(224, 224))
    kept = dl / f"ViT-B-16-{sha[:12]}.pt"
    assert b.weights_path == str(kept) and kept.read_bytes() == body
    assert not (dl / "ViT-B-16.pt").exists()  # never stored as OpenAI's file
    assert b.display_name == f"vitb16 (weights from {kept.name})"
    # with downloads off, the message names the file and address the override asks for
    monkeypatch.setenv("HANDCLIP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as exc:
        build_backbone("vitb16", download_root=tmp_path / "other", image_size=(224, 224))
    assert kept.name in str(exc.value) and server.url("/models/my-vit.pt") in str(exc.value)


@pytest.mark.parametrize("value,problem", [
    ("http://127.0.0.1:1/x.pt#md5=abc", "sha256=<64 hex digits>"),
    ("http://127.0.0.1:1/x.pt#sha256=1234", "sha256=<64 hex digits>"),
    ("ftp://example.org/x.pt", "http://, https:// or file://"),
])
def test_a_malformed_address_override_is_an_error(value, problem, online, monkeypatch,
                                                  tmp_path):
    monkeypatch.setenv(URL_VAR, value)
    with pytest.raises(ValueError) as exc:
        build_backbone("vitb16", download_root=tmp_path, image_size=(224, 224))
    assert URL_VAR in str(exc.value) and problem in str(exc.value)


def test_file_addresses_work_for_a_mirror_on_a_shared_file_system(online, monkeypatch,
                                                                  tmp_path):
    body = os.urandom(70_000)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "ViT-B-16.pt").write_bytes(body)
    monkeypatch.setenv(URL_VAR, (shared / "ViT-B-16.pt").as_uri() + f"#sha256={_sha(body)}")
    source = download_source(VITB16)
    final = download_verified(source, tmp_path / "dl")
    assert final.name == f"ViT-B-16-{_sha(body)[:12]}.pt" and final.read_bytes() == body


# ------------------------------------------------------------------------------------------------
# several jobs, one cache
# ------------------------------------------------------------------------------------------------


def _race(source, folder, jobs=4):
    """``jobs`` threads downloading ``source`` into ``folder`` at once; their results."""
    results, barrier = [None] * jobs, threading.Barrier(jobs)

    def job(i):
        barrier.wait()
        try:
            results[i] = download_verified(source, folder)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            results[i] = exc

    threads = [threading.Thread(target=job, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_jobs_downloading_at_once_take_turns_and_download_once(server, tmp_path):
    body = os.urandom(1 << 21)
    url = server.serve("/ViT-B-16.pt", body, pause=0.005)  # 32 slow blocks: the jobs overlap
    source = DownloadSource(url, _sha(body), "ViT-B-16.pt", True)
    results = _race(source, tmp_path)
    assert results == [tmp_path / "ViT-B-16.pt"] * 4
    assert server.requests == ["/ViT-B-16.pt"]  # the others waited and used its file
    assert (tmp_path / "ViT-B-16.pt").read_bytes() == body and _leftovers(tmp_path) == []


def test_the_cache_stays_correct_without_the_lock(server, tmp_path, monkeypatch):
    """On a file system without locks every job downloads, and the cache is still right."""

    @contextmanager
    def no_lock(path, waiting_for):
        yield False

    monkeypatch.setattr(weight_download, "take_turn", no_lock)
    body = os.urandom(1 << 21)
    url = server.serve("/ViT-B-16.pt", body, pause=0.005)
    source = DownloadSource(url, _sha(body), "ViT-B-16.pt", True)
    results = _race(source, tmp_path)
    assert all(r == tmp_path / "ViT-B-16.pt" for r in results), results
    assert len(server.requests) == 4
    assert (tmp_path / "ViT-B-16.pt").read_bytes() == body and _leftovers(tmp_path) == []


def test_a_file_finished_by_another_job_is_checked_before_use(server, tmp_path, monkeypatch):
    body = os.urandom(10_000)
    source = DownloadSource(server.serve("/f.pt", body), _sha(body), "f.pt", True)
    (tmp_path / "f.pt").write_bytes(body)  # as if a job finished it while this one waited
    assert download_verified(source, tmp_path) == tmp_path / "f.pt"
    assert server.requests == []
    (tmp_path / "f.pt").write_bytes(body[:5000])
    with pytest.raises(DownloadError, match="not the expected file"):
        download_verified(source, tmp_path)
    assert (tmp_path / "f.pt").read_bytes() == body[:5000]  # someone else's file: left alone


def test_parts_of_killed_downloads_are_removed_under_the_lock(server, tmp_path):
    body = os.urandom(10_000)
    source = DownloadSource(server.serve("/f.pt", body), _sha(body), "f.pt", True)
    abandoned = tmp_path / ".f.pt.k1ll3d.part"
    abandoned.write_bytes(b"x" * 1000)
    other = tmp_path / ".g.pt.k1ll3d.part"  # another file's download: not ours to remove
    other.write_bytes(b"y")
    download_verified(source, tmp_path)
    assert not abandoned.exists() and other.exists()


# ------------------------------------------------------------------------------------------------
# end to end: stage 0 through papermill with an empty download_root
# ------------------------------------------------------------------------------------------------


@pytest.mark.notebook
@pytest.mark.usefixtures("kernel_threads")
def test_stage0_notebook_downloads_vitb16_into_an_empty_download_root(
        server, online, monkeypatch, workbench_home, tiny_release):
    """``-p backbone vitb16 -p download_root <empty dir>``: the kernel downloads the checkpoint
    (a tiny ViT in OpenAI's release format, under the address override with its SHA-256) and
    stage 0 runs on it, naming the weights by their file, not as OpenAI's."""
    from handclip_nb.pipeline import run_notebook
    from handclip_nb.runs import read_metrics

    body, _ = tiny_release
    sha = _sha(body)
    monkeypatch.setenv(URL_VAR, server.serve("/ViT-B-16.pt", body) + f"#sha256={sha}")
    dl = workbench_home / "empty"
    dl.mkdir()
    out = workbench_home / "outputs" / "s0-vitb16"
    run_notebook("stage0_zeroshot.ipynb", workbench_home / "s0.ipynb",
                 {"num_splits": 2, "synthetic_subjects": 12, "synthetic_images": 4,
                  "batch_size": 32, "backbone": "vitb16", "download_root": str(dl),
                  "image_size": [96, 128],
                  "output_dir": str(out)}, progress=False)
    m = read_metrics(out)
    assert m["backbone"] == "vitb16"
    assert m["backbone_display"] == f"vitb16 (weights from ViT-B-16-{sha[:12]}.pt)"
    assert (dl / f"ViT-B-16-{sha[:12]}.pt").read_bytes() == body
    assert server.requests == ["/ViT-B-16.pt"]
