"""Constants mirroring the real datasets, the seed streams and the shared argument check.

Everything here is shared by several modules of the generator: the 11k vocabulary (aspects,
skin colours, CSV header), the rest geometry of a hand, and the salted seed streams from which
every person (:mod:`.people`), photo (:mod:`.render`) and accessory (:mod:`.writers`) is drawn.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "ASPECTS",
    "HANDINFO_HEADER",
    "LAYOUTS",
    "CAPTIONS_HEADER",
    "GENDERS",
    "SKIN_COLORS",
    "NAIL_POLISH_COLORS",
    "NAIL_SHAPES",
    "FINGERS",
    "MARK_KINDS",
    "ACCESSORIES",
    "RENDER_CAP",
    "image_seed",
]

ASPECTS = ("dorsal right", "dorsal left", "palmar right", "palmar left")
HANDINFO_HEADER = (
    "id",
    "age",
    "gender",
    "skinColor",
    "accessories",
    "nailPolish",
    "aspectOfHand",
    "imageName",
    "irregularities",
)
LAYOUTS = ("11k", "hd")
CAPTIONS_HEADER = ("image", "caption")
GENDERS = ("male", "female")
# skinColor values of the real HandInfo.csv, with the base RGB of the back of the hand.
SKIN_COLORS = ("very fair", "fair", "medium", "dark")
_SKIN_PROBS = (0.05, 0.32, 0.52, 0.11)  # close to the real image shares (330/3493/6495/758)
_SKIN_RGB = {
    "very fair": (238, 204, 184),
    "fair": (226, 182, 152),
    "medium": (198, 150, 114),
    "dark": (132, 90, 62),
}
_PALM_PINK = (238, 188, 170)
NAIL_POLISH_COLORS = {
    "red": (196, 22, 38),
    "dark red": (112, 14, 30),
    "pink": (236, 112, 164),
    "coral": (246, 112, 84),
    "purple": (112, 42, 142),
    "black": (28, 22, 28),
    "blue": (40, 72, 190),
    "nude": (214, 160, 136),
}
NAIL_SHAPES = ("round", "square", "almond", "short")
FINGERS = ("thumb", "index finger", "middle finger", "ring finger", "little finger")
MARK_KINDS = ("mole", "freckles", "scar", "tattoo dots")
ACCESSORIES = ("ring", "bracelet", "watch")
_METALS = {"gold": (214, 172, 64), "silver": (192, 194, 204)}

# Largest picture the hand is drawn at, (width, height), compared by area: a larger photo (the
# real datasets' 1600x1200) is drawn at this area with its own aspect ratio, upscaled bicubic
# and given its sensor noise at full size (:func:`.render.render_photo`). 400x300 is a quarter
# of 1600x1200 in each direction (a whole factor), and above the largest model input (CLIP's
# 224x288 (height, width) letterbox, with room for scale augmentation), so the model never sees
# detail that was not drawn; drawing costs ~35 ms there against ~1 s at 1600x1200.
RENDER_CAP = (400, 300)

# Salt for the seed sequences so that the streams never collide with other users of the seed.
_SALT = 0x5EED_4A2D
_STREAM_PERSON, _STREAM_IMAGE, _STREAM_ACCESSORY = 1, 2, 3

# Rest geometry (dorsal right coordinates, palm width = 1).
_FINGER_BASE_X = (-0.375, -0.125, 0.125, 0.375)  # index .. little, times palm width
_FINGER_LEN = (0.64, 0.78, 0.88, 0.82, 0.64)  # thumb, index, middle, ring, little
_FINGER_WID = (0.27, 0.205, 0.21, 0.195, 0.165)
_FINGER_SPLAY = (-38.0, -9.0, -2.0, 5.0, 13.0)  # degrees from vertical, + towards +x
_KNUCKLE_DY = (0.02, 0.05, 0.03, -0.05)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_SALT, *[int(k) for k in keys]]))


def image_seed(seed: int, person_number: int, aspect: str | int, index: int) -> int:
    """The photo seed of image ``index`` of ``aspect`` of person ``person_number``."""
    a = ASPECTS.index(aspect) if isinstance(aspect, str) else int(aspect)
    state = np.random.SeedSequence(
        [_SALT, int(seed), _STREAM_IMAGE, int(person_number), a, int(index)]
    ).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _check_difficulty(difficulty: float) -> float:
    d = float(difficulty)
    if not (0.0 <= d <= 1.0) or math.isnan(d):
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
    return d
