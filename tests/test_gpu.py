"""CUDA behaviour of the training and feature paths: mixed-precision training steps, channels-last
ResNet towers, feature extraction on the GPU against the CPU.

Every test here carries the ``cuda`` marker: skipped where torch sees no CUDA device (the
conftest hook), run by ``make gpu-check`` on a lent GPU machine (benchmarks/README.md, "GPU
check").  Tiny untrained backbones keep each test to seconds.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from builders import run_params

from handclip_nb.data.images import image_source
from handclip_nb.device import Precision, configure_cuda
from handclip_nb.evaluate.features import extract_features
from handclip_nb.models import build_backbone
from handclip_nb.models.reid import ReIDModel
from handclip_nb.train.loop import TrainLoop, run_precision
from handclip_nb.train.stage2 import image_param_groups, reid_loss

pytestmark = pytest.mark.cuda

SIZE = (96, 128)


@pytest.fixture()
def full_fp32():
    """TF32 off for the test (exact fp32 comparisons), the previous flags restored after."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    configure_cuda(False)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_amp_training_steps_keep_fp32_master_weights_and_the_loss_falls(tmp_path, amp_dtype):
    """Stage 2's model, loss and loop under fp16 (with a GradScaler) or bf16 autocast: the
    forward runs in the low precision, the weights the optimiser updates and their gradients
    stay fp32, and the loss on a repeated batch is finite and falls."""
    device = torch.device("cuda")
    params = run_params("stage2", tmp_path / "run", device="cuda", amp=True, amp_dtype=amp_dtype,
                        lr=1e-3)
    precision = run_precision(params, device)
    assert precision.enabled and precision.dtype == {"float16": torch.float16,
                                                     "bfloat16": torch.bfloat16}[amp_dtype]
    backbone = build_backbone("tiny-vit", image_size=SIZE, seed=0, device=device)
    backbone.requires_grad_(False)
    backbone.visual.requires_grad_(True)
    model = ReIDModel(backbone, 4, params["classifier"],
                      triplet_features=params["triplet_features"]).to(device)
    modules = model.trainable_modules()
    optimizer = torch.optim.Adam(image_param_groups(modules, params))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, *SIZE, generator=generator).to(device)
    labels = torch.arange(4).repeat_interleave(4).to(device)
    text_all = F.normalize(torch.randn(4, backbone.embed_dim, generator=generator), dim=-1).to(device)
    logit_scale = backbone.logit_scale.exp().detach()
    before = {id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]}
    forward_dtypes = set()

    def step(batch):
        batch_images, targets = batch
        feats, out = model(batch_images, targets)
        forward_dtypes.add(feats.global_embedding.dtype)
        return reid_loss(out, feats, targets, params, text_all, logit_scale)

    loop = TrainLoop(stage="stage2", output_dir=tmp_path / "run", modules=modules,
                     optimizer=optimizer, scheduler=None, step=step,
                     batches=lambda epoch: [(images, labels)] * 4,
                     grad_clip=params["grad_clip"] or None, device=device, precision=precision,
                     params=dict(params), progress=False)
    fit = loop.fit(6)

    losses = [h["loss"]["loss"] for h in fit.history]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    assert forward_dtypes == {precision.dtype}  # the forward really ran in the low precision
    assert loop.scaler.is_enabled() == (amp_dtype == "float16")  # bf16 needs no loss scaling
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.grad.dtype == torch.float32 for p in trained if p.grad is not None)
    assert any(not torch.equal(p, before[id(p)]) for p in trained)


@pytest.mark.parametrize("precision_name", ["fp32", "fp16"])
def test_channels_last_resnet_forward_equals_the_contiguous_one(full_fp32, precision_name):
    """``use_channels_last`` changes the memory layout, not the values: every output of the
    ResNet tower matches the contiguous model's (fp32 to 1e-4; fp16 autocast by cosine, since
    the two layouts may pick kernels that round differently)."""
    contiguous = build_backbone("tiny-rn", image_size=SIZE, seed=0, device="cuda")
    channels_last = copy.deepcopy(contiguous).use_channels_last()
    assert channels_last.channels_last and not contiguous.channels_last
    assert channels_last.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(0)).cuda()
    precision = Precision("cuda", enabled=precision_name == "fp16", dtype=torch.float16)
    with torch.no_grad(), precision.autocast():
        expected = contiguous.encode_image(images)
        actual = channels_last.encode_image(images)
    for name in ("global_embedding", "patch_tokens", "pre_projection", "intermediate"):
        want, got = getattr(expected, name).float(), getattr(actual, name).float()
        if precision_name == "fp32":
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
        else:
            cosine = F.cosine_similarity(got.flatten(1), want.flatten(1), dim=1)
            assert float(cosine.min()) > 0.999, (name, cosine)


def test_extract_features_on_cuda_equals_the_cpu(synthetic_11k, workbench_home, full_fp32):
    """``extract_features`` of the same photos and weights: on CUDA in fp32 (TF32 off) within
    1e-4 of the CPU; in fp16 autocast (a run's amp default on CUDA) every row's cosine above
    0.999."""
    paths = [str(p) for p in sorted((synthetic_11k / "Hands").glob("*.jpg"))[:24]]
    cpu_backbone = build_backbone("tiny-vit", image_size=SIZE, seed=0)
    gpu_backbone = copy.deepcopy(cpu_backbone).to("cuda")
    source = image_source(cpu_backbone.preprocess_config(), {"decode_cache": True})
    on_cpu = extract_features(cpu_backbone, paths, source, batch_size=8, device="cpu")
    fp32 = extract_features(gpu_backbone, paths, source, batch_size=8, device="cuda",
                            precision=Precision("cuda", enabled=False))
    default = extract_features(gpu_backbone, paths, source, batch_size=8, device="cuda",
                               precision=Precision("cuda", enabled=True, dtype=torch.float16))
    assert on_cpu.shape == fp32.shape == default.shape == (len(paths), cpu_backbone.embed_dim)
    assert fp32.device.type == "cpu" and fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, on_cpu, atol=1e-4, rtol=1e-4)
    assert float(F.cosine_similarity(default, on_cpu, dim=1).min()) > 0.999
