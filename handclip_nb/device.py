"""Where tensors go and how: ``device="auto"`` and friends, resolved once for every layer;
the machine's usable cores and the data-loader workers derived from them; a run's share of a
GPU that several runs use at once; mixed precision (fp16 with a gradient scaler, or bf16
without) and TF32."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from .host import CPU_SHARE_ENV, GPU_SHARE_ENV, available_cpus, gpu_memory_share

__all__ = ["resolve_device", "available_cpus", "CPU_SHARE_ENV", "GPU_SHARE_ENV",
           "gpu_memory_share", "default_num_workers", "Precision", "AMP_DTYPES",
           "configure_cuda", "run_precision"]

#: Values of the ``amp_dtype`` parameter -> the autocast dtype.
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given."""
    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        dev = device
    else:
        text = str(device).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    if dev.type == "cuda":
        _apply_gpu_memory_share(dev)
    return dev


_SHARED_DEVICES: set[int] = set()  # CUDA device indices already capped by this process


def _apply_gpu_memory_share(dev: torch.device) -> None:
    share = gpu_memory_share()
    if share is None:
        return
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index in _SHARED_DEVICES:
        return
    torch.cuda.set_per_process_memory_fraction(share, index)
    _SHARED_DEVICES.add(index)


def default_num_workers(device: Union[str, torch.device, None]) -> int:
    """Data-loader worker processes when ``num_workers`` is None (the default).

    On CUDA the loader must keep the GPU fed, so every core but one (for the training process)
    loads, up to 8 (with decoded images cached, 8 workers augment several thousand images/s,
    more than one GPU trains ViT-B/16 on). On a CPU the model's own arithmetic competes with the
    workers for the same cores: none up to 4 cores, then a quarter of them.
    """
    cpus = available_cpus()
    if resolve_device(device).type == "cuda":
        return max(1, min(8, cpus - 1))
    return 0 if cpus <= 4 else cpus // 4


@dataclass(frozen=True)
class Precision:
    """The autocast of a forward pass: off, fp16 (with a gradient scaler: fp16 gradients
    underflow) or bf16 (fp32's exponent range: no scaler). Weights stay fp32 (master weights)
    either way; autocast only runs the matrix products in the lower precision."""

    device_type: str = "cpu"
    enabled: bool = False
    dtype: torch.dtype = torch.float16

    @classmethod
    def resolve(cls, amp: bool, amp_dtype: str, device: Union[str, torch.device]) -> "Precision":
        """The run's parameters ``amp`` / ``amp_dtype`` on ``device``: mixed precision on CUDA
        only (a CPU run trains in fp32, as the tests and the demo do)."""
        if amp_dtype not in AMP_DTYPES:
            raise ValueError(f"unknown amp_dtype {amp_dtype!r}; valid: {', '.join(AMP_DTYPES)}")
        dev = resolve_device(device)
        enabled = bool(amp) and dev.type == "cuda"
        dtype = AMP_DTYPES[amp_dtype]
        if enabled and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"amp_dtype 'bfloat16' needs a GPU with bf16 (Ampere or newer); "
                             f"{torch.cuda.get_device_name(dev)} has none: use amp_dtype "
                             f"'float16'")
        return cls(device_type=dev.type, enabled=enabled, dtype=dtype)

    @property
    def name(self) -> str:
        """``fp32``, ``fp16`` or ``bf16``: the precision of the autocast matrix products."""
        if not self.enabled:
            return "fp32"
        return "bf16" if self.dtype == torch.bfloat16 else "fp16"

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def describe(self) -> str:
        if not self.enabled:
            return "fp32"
        return "bf16 autocast" if self.dtype == torch.bfloat16 else "fp16 autocast + GradScaler"


def run_precision(params, device) -> Precision:
    """The mixed precision of a run's ``amp`` / ``amp_dtype`` on ``device`` (fp32 where the
    run has no ``amp``): one place decides it for training and for the features every stage,
    evaluation and search encode with that run."""
    return Precision.resolve(params.get("amp", False), params.get("amp_dtype", "float16"), device)


def configure_cuda(tf32: bool) -> None:
    """TF32 for fp32 matrix products and convolutions on Ampere and newer GPUs (10-bit
    mantissa, fp32 range: about 8x the fp32 throughput at a precision a re-ID model does not
    notice); no effect on a CPU."""
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
