"""The one way to open an image file: the EXIF orientation as a policy, HEIC through pillow-heif.

Every reader and figure of the workbench opens image files here: the decoded-image pipeline
(:mod:`.images`), the datasets of plain transforms (:mod:`.datasets`), the captioned
pretraining data (:mod:`.captioned`), the header check of every dataset and gallery
(:func:`.protocols.find_image_problems`), the figures (``viz.py``, ``attention/``, ``search.py``).

**Orientation.** A phone stores a portrait photo as landscape pixels and an EXIF tag
(``0x0112``, values 1-8) saying how to turn them for display; PIL's ``Image.open`` returns the
stored pixels. The policy is a parameter of every reader:

* ``"exif"``: the tag is applied (``PIL.ImageOps.exif_transpose``): the photo as the phone
  showed it. Tags 5-8 turn it by 90 or 270 degrees, so width and height swap.
* ``"ignore"``: the pixels as stored, as the literature's loaders read 11k and HD (MBA-Net's and
  CLIP-ReID's ``Image.open(path).convert("RGB")``).

The run parameter ``exif_orientation`` chooses it (``auto``: ``exif`` for custom datasets and
the search, ``ignore`` for 11k and HD; ``params.exif_orientation_for``; docs/protocols.md).

**HEIC/HEIF** (iPhone photos by default): PIL reads them only through the optional package
``pillow-heif``. Its opener is registered with PIL on the first ``.heic``/``.heif`` file, once
per process (:func:`heif_support`); without the package such a file is refused at once with
:class:`HeifSupportMissing`, which names the file and the fix. libheif applies a HEIC's own
rotation while it decodes, so a HEIC is upright under both policies.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageOps

__all__ = ["ORIENTATIONS", "HEIF_SUFFIXES", "HeifSupportMissing", "heif_support", "is_heif",
           "check_orientation", "open_file", "exif_rotation", "turns_sideways",
           "oriented_rgb", "open_image"]

#: The concrete orientation policies (the parameter's ``auto`` resolves to one of them).
ORIENTATIONS = ("exif", "ignore")
#: File suffixes of HEIC/HEIF photos, read through pillow-heif.
HEIF_SUFFIXES = (".heic", ".heif")
#: The EXIF tag that says how to turn the stored pixels for display.
ORIENTATION_TAG = 0x0112
#: Tag values that turn the picture by 90 or 270 degrees (width and height swap).
_SIDEWAYS = (5, 6, 7, 8)


class HeifSupportMissing(OSError):
    """A HEIC/HEIF photo, and pillow-heif is not installed to read it."""

    #: what is wrong and the fix, without the path (readers that name the file themselves)
    reason = ("a HEIC/HEIF photo needs the package pillow-heif: pip install pillow-heif and "
              "restart the kernel, or convert the photo to JPEG")

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        super().__init__(f"{self.path}: {self.reason}")


def is_heif(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in HEIF_SUFFIXES


@functools.cache
def heif_support() -> bool:
    """True when pillow-heif is installed; its opener is registered with PIL on the first call
    (once per process: the result is kept)."""
    try:
        # on the first HEIC photo only: an optional package whose native library no 11k or HD
        # run needs to load
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def check_orientation(orientation: str) -> str:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"EXIF orientation policy {orientation!r}: expected one of "
                         f"{', '.join(ORIENTATIONS)} (the parameter exif_orientation's 'auto' "
                         f"is resolved by params.resolve_params)")
    return orientation


@contextmanager
def open_file(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``path`` opened by PIL, header read and pixels not decoded yet (a reader may still ask
    for a reduced-scale decode); a HEIC/HEIF without pillow-heif raises
    :class:`HeifSupportMissing` before PIL tries."""
    if is_heif(path) and not heif_support():
        raise HeifSupportMissing(path)
    with Image.open(path) as im:
        yield im


def exif_rotation(im: Image.Image) -> int:
    """The EXIF orientation tag of an opened image, 1 (as stored) when absent or invalid."""
    value = im.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def turns_sideways(im: Image.Image, orientation: str) -> bool:
    """True when ``orientation`` turns this opened image by 90 or 270 degrees."""
    return check_orientation(orientation) == "exif" and exif_rotation(im) in _SIDEWAYS


def oriented_rgb(im: Image.Image, orientation: str) -> Image.Image:
    """The pixels of an opened image under ``orientation``, decoded, as an RGB image."""
    if check_orientation(orientation) == "exif" and exif_rotation(im) != 1:
        im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


def open_image(path: str | os.PathLike, orientation: str) -> Image.Image:
    """The image at ``path`` as an RGB PIL image, turned as ``orientation`` says (``"exif"``:
    upright as the camera showed it; ``"ignore"``: the pixels as stored)."""
    check_orientation(orientation)
    with open_file(path) as im:
        return oriented_rgb(im, orientation)
