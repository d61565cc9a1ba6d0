"""Image transforms: one builder for training and evaluation, CLIP normalisation in both.

The earlier implementation normalised only at final evaluation (DESIGN §6.2); here both
pipelines end in the same :class:`torchvision.transforms.Normalize` with CLIP's statistics,
and a test checks it.  Hands are 4:3 landscape photos: the default ``resize_mode="pad"``
letterboxes them (aspect ratio kept, borders filled with CLIP's mean colour, which is zero
after normalisation); ``"squash"`` stretches and must be asked for.  Horizontal flip is off by
default because it turns a right hand into a left one.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from torchvision import transforms as T

from ..models.backbones import CLIP_MEAN, CLIP_STD

__all__ = ["LetterboxResize", "AugmentConfig", "build_transform", "CLIP_MEAN", "CLIP_STD"]

_MEAN_RGB = tuple(int(round(255 * m)) for m in CLIP_MEAN)


class LetterboxResize:
    """Resize to fit inside (height, width) keeping the aspect ratio, then pad to the size."""

    def __init__(self, size: tuple[int, int], fill: tuple[int, int, int] = _MEAN_RGB,
                 interpolation=Image.BICUBIC):
        self.height, self.width = int(size[0]), int(size[1])
        self.fill = fill
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = min(self.width / w, self.height / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = img.convert("RGB").resize((nw, nh), self.interpolation)
        canvas = Image.new("RGB", (self.width, self.height), self.fill)
        canvas.paste(resized, ((self.width - nw) // 2, (self.height - nh) // 2))
        return canvas

    def __repr__(self) -> str:
        return f"LetterboxResize(size=({self.height}, {self.width}), fill={self.fill})"


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (CLIP-ReID's recipe minus the flip, plus colour jitter)."""

    pad: int = 10
    erasing_p: float = 0.5
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 disables
    hflip_p: float = 0.0  # a flipped right hand is a left hand: off unless asked for


def build_transform(image_size: tuple[int, int] | list[int], train: bool = False,
                    resize_mode: str = "pad", augment: AugmentConfig | None = None) -> T.Compose:
    """The transform for ``image_size`` = (height, width).  Evaluation when ``train`` is False."""
    size = (int(image_size[0]), int(image_size[1]))
    if resize_mode == "pad":
        resize = LetterboxResize(size)
    elif resize_mode == "squash":
        resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; valid: pad, squash")
    to_rgb = T.Lambda(_to_rgb)
    normalize = T.Normalize(CLIP_MEAN, CLIP_STD)
    if not train:
        return T.Compose([to_rgb, resize, T.ToTensor(), normalize])
    aug = augment or AugmentConfig()
    steps = [to_rgb, resize]
    if aug.hflip_p > 0:
        steps.append(T.RandomHorizontalFlip(aug.hflip_p))
    if aug.pad > 0:
        steps += [T.Pad(aug.pad, fill=_MEAN_RGB), T.RandomCrop(size)]
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0))
    steps += [T.ToTensor(), normalize]
    if aug.erasing_p > 0:
        steps.append(T.RandomErasing(p=aug.erasing_p, value=0.0))
    return T.Compose(steps)


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB") if img.mode != "RGB" else img
