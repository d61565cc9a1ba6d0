"""Image transforms: one builder for training and evaluation, built from the backbone's own
preprocessing config (:class:`~handclip_nb.backbone_specs.PreprocessConfig`, from
``backbone.preprocess_config()``), so the input size, resize mode and normalisation a model
sees cannot drift from what it was built for.

The earlier implementation normalised only at final evaluation (docs/mistakes.md #2); here both
pipelines end in the same :class:`torchvision.transforms.Normalize` with the backbone's
statistics, and a test checks the loaders the stages actually use.  Hands are 4:3 landscape photos: the default ``resize_mode="pad"``
letterboxes them (aspect ratio kept, borders filled with CLIP's mean colour, which is zero
after normalisation); ``"squash"`` stretches and must be asked for.  Horizontal flip is off by
default because it turns a right hand into a left one.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from torchvision import transforms as T

from ..backbone_specs import PreprocessConfig
from ..constants import CLIP_MEAN

__all__ = ["LetterboxResize", "AugmentConfig", "build_transform", "resize_step", "CheckSize"]

_INTERPOLATION = {"bicubic": (Image.BICUBIC, T.InterpolationMode.BICUBIC),
                  "bilinear": (Image.BILINEAR, T.InterpolationMode.BILINEAR)}


def _mean_rgb(mean) -> tuple[int, int, int]:
    """The normalisation mean as an 8-bit colour: padding in it is zero after normalising."""
    return tuple(int(round(255 * m)) for m in mean)


_MEAN_RGB = _mean_rgb(CLIP_MEAN)


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
    #: (height, width) of a random crop taken right after the resize, from images resized
    #: larger than the model's input (CLIP-HandID: 256 x 256 -> 224 x 224); None = no crop
    crop: tuple[int, int] | None = None


def resize_step(preprocess: PreprocessConfig):
    """The deterministic resize of a backbone's ``preprocess`` config (PIL image -> PIL image at
    its (height, width)): letterbox for ``resize_mode="pad"``, stretch for ``"squash"``.  The
    decoded-image cache stores exactly this step's output (``data/images.py``)."""
    size = (int(preprocess.image_size[0]), int(preprocess.image_size[1]))
    if preprocess.interpolation not in _INTERPOLATION:
        raise ValueError(f"unknown interpolation {preprocess.interpolation!r}; valid: "
                         f"{', '.join(_INTERPOLATION)}")
    pil_mode, tv_mode = _INTERPOLATION[preprocess.interpolation]
    if preprocess.resize_mode == "pad":
        return LetterboxResize(size, fill=_mean_rgb(preprocess.mean), interpolation=pil_mode)
    if preprocess.resize_mode == "squash":
        return T.Resize(size, interpolation=tv_mode)
    raise ValueError(f"unknown resize_mode {preprocess.resize_mode!r}; valid: pad, squash")


class CheckSize:
    """Refuse an image that is not already at (height, width): the first step of a transform
    for pre-resized (cached) images, so a cache built for another geometry fails loudly."""

    def __init__(self, size: tuple[int, int]):
        self.height, self.width = int(size[0]), int(size[1])

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size != (self.width, self.height):
            raise ValueError(f"decoded image is {img.size[1]}x{img.size[0]} (height x width) "
                             f"but this transform expects {self.height}x{self.width}: the image "
                             f"was resized for another input size")
        return img

    def __repr__(self) -> str:
        return f"CheckSize(({self.height}, {self.width}))"


def build_transform(preprocess: PreprocessConfig, train: bool = False,
                    augment: AugmentConfig | None = None, resized: bool = False) -> T.Compose:
    """The transform of a backbone's ``preprocess`` config (``backbone.preprocess_config()``):
    resize to its (height, width) by its resize mode, normalise with its mean and std.
    Evaluation when ``train`` is False; training adds ``augment``.

    ``resized=True`` builds the steps after the resize, for images that are already at the
    input size (the decoded-image cache): the augmentation then runs on exactly the pixels the
    full transform would have produced after its resize step."""
    if not isinstance(preprocess, PreprocessConfig):
        raise TypeError(
            f"build_transform takes a PreprocessConfig (backbone.preprocess_config()), got "
            f"{type(preprocess).__name__} {preprocess!r}: the transform must come from the "
            f"model's own config so the two cannot drift apart")
    size = (int(preprocess.image_size[0]), int(preprocess.image_size[1]))
    resize = CheckSize(size) if resized else resize_step(preprocess)
    fill = _mean_rgb(preprocess.mean)
    to_rgb = T.Lambda(_to_rgb)
    normalize = T.Normalize(preprocess.mean, preprocess.std)
    if not train:
        return T.Compose([to_rgb, resize, T.ToTensor(), normalize])
    aug = augment or AugmentConfig()
    steps = [to_rgb, resize]
    if aug.crop is not None:
        steps.append(T.RandomCrop((int(aug.crop[0]), int(aug.crop[1]))))
    if aug.hflip_p > 0:
        steps.append(T.RandomHorizontalFlip(aug.hflip_p))
    if aug.pad > 0:
        steps += [T.Pad(aug.pad, fill=fill), T.RandomCrop(size)]
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0))
    steps += [T.ToTensor(), normalize]
    if aug.erasing_p > 0:
        steps.append(T.RandomErasing(p=aug.erasing_p, value=0.0))
    return T.Compose(steps)


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB") if img.mode != "RGB" else img
