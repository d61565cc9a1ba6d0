"""Synthetic hands: a small, deterministic stand-in for the 11k Hands and HD datasets.

The real datasets are not available in this environment, so tests, notebooks and smoke runs use
people drawn by this module. Each :class:`SyntheticPerson` has stable, human-describable identity
cues (hand and finger proportions, skin tone, nail shape and polish, marks, creases, knuckle
wrinkles, veins); every photo of that person varies in pose, scale, finger spread, lighting,
background, blur and sensor noise. Identities are therefore separable only by learning the cues,
which makes the data a real (if small) re-identification problem.

Geometry convention: a hand is modelled once, in "dorsal right" coordinates (x to the right,
y up, origin at the wrist centre, palm width = 1 unit, thumb on the -x side). The palmar view
shows the same hand from the other side (x mirrored, different surface details), and a LEFT hand
is the exact horizontal mirror image of the same person's RIGHT hand: :func:`render_image` draws
the right hand and flips the finished (noise-free) picture, then adds sensor noise. So
``render_image(p, "dorsal left", s, noise=False)`` is pixel-for-pixel the horizontal flip of
``render_image(p, "dorsal right", s, noise=False)``.

Layouts written by :func:`generate_dataset` (and the CLI)::

    11k:  ROOT/Hands/Hand_0000001.jpg ...  and  ROOT/HandInfo.csv  (real header and quoting)
    hd:   ROOT/Original Images/1-501/<id>_<n>.jpg     main subjects, ids 1..N
          ROOT/Original Images/502-712/<id>_<n>.jpg   distractors, ids 502..502+M-1
    both: ROOT/captions.csv  ``image,caption`` -- every photo's caption (:func:`caption_for`),
          built from what the photo shows: view and side, gender, skin tone, nail polish,
          proportions, the accessory drawn and the person's visible marks

CLI::

    python -m handclip_nb.data.synthetic --root DIR --subjects N --images-per-subject K --seed S

Determinism: every person is generated from (seed, person number) and every photo from
(seed, person number, aspect, image index), so the same arguments give byte-identical CSVs and
identical pixels, and changing ``--images-per-subject`` does not change who the people are.
``difficulty`` in [0, 1] (default 0.5) raises the per-photo variation and makes people more alike;
it is part of a person's recipe (the same seed at another difficulty gives related, not identical,
people).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .captions import CAPTIONS_FILE

__all__ = [
    "ASPECTS",
    "HANDINFO_HEADER",
    "SKIN_COLORS",
    "NAIL_POLISH_COLORS",
    "ACCESSORIES",
    "Mark",
    "HandGeometry",
    "SyntheticPerson",
    "PhotoParams",
    "make_person",
    "image_seed",
    "sample_photo",
    "render_image",
    "render_photo",
    "caption_phrases",
    "caption_for",
    "CAPTIONS_FILE",
    "accessory_plan",
    "generate_dataset",
    "main",
]

# --------------------------------------------------------------------------------------------
# Constants mirroring the real datasets
# --------------------------------------------------------------------------------------------

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


def _mix(c1, c2, t: float) -> tuple[int, int, int]:
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c1, c2))


def _scale(c, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(a * f)))) for a in c)


def _check_difficulty(difficulty: float) -> float:
    d = float(difficulty)
    if not (0.0 <= d <= 1.0) or math.isnan(d):
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
    return d


# --------------------------------------------------------------------------------------------
# People
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """A stable skin mark, positioned relative to the hand.

    ``region`` is ``"back of the hand"``, ``"palm"``, ``"wrist"`` or a finger name. For palm,
    back and wrist marks ``pos`` is (x, y) in hand units (palm width 1, wrist centre at the
    origin, dorsal right coordinates); for finger marks it is (t, s): t in [0, 1] along the
    finger from its base, s in [-1, 1] across it. ``size`` is in hand units, ``angle`` in degrees
    (scars and dot patterns), ``offsets`` the relative dot positions of freckles/tattoo dots.
    """

    kind: str
    region: str
    surface: str  # "dorsal" | "palmar"
    pos: tuple[float, float]
    size: float
    angle: float
    color: tuple[int, int, int]
    offsets: tuple[tuple[float, float], ...] = ()

    def describe(self) -> str:
        """Human phrase, e.g. ``"mole on the ring finger"``."""
        if self.region in FINGERS:
            where = self.region if self.surface == "dorsal" else f"palm side of the {self.region}"
        elif self.region == "wrist":
            where = "wrist" if self.surface == "dorsal" else "inner wrist"
        else:
            where = self.region
        return f"{self.kind} on the {where}"


@dataclass(frozen=True)
class HandGeometry:
    """Identity geometry in hand units (palm width of the rest pose = 1)."""

    palm_width: float
    palm_height: float
    finger_lengths: tuple[float, float, float, float, float]  # thumb, index, middle, ring, little
    finger_widths: tuple[float, float, float, float, float]
    finger_splay: tuple[float, float, float, float, float]  # rest angles, degrees
    knuckle_dy: tuple[float, float, float, float]  # MCP heights of index..little
    joint_fractions: tuple[float, float]  # PIP and DIP positions along the fingers
    thumb_base: tuple[float, float]
    wrist_width: float


@dataclass(frozen=True)
class SyntheticPerson:
    """One synthetic person: metadata of the 11k CSV plus explicit, describable identity cues."""

    number: int
    gender: str
    age: int
    skin_color: str  # the 11k skinColor value: "very fair" | "fair" | "medium" | "dark"
    skin_rgb: tuple[int, int, int]  # back of the hand
    palm_rgb: tuple[int, int, int]
    nail_shape: str
    nail_length: float  # how far the nail reaches past the fingertip, hand units
    nail_polish: str | None  # colour name or None
    geometry: HandGeometry
    marks: tuple[Mark, ...]
    knuckle_wrinkles: tuple[int, int, int, int, int]  # wrinkle lines at the PIP joint per finger
    wrinkle_strength: float
    veins: tuple[tuple[float, float, float], ...]  # (x at wrist, x at knuckles, bend)
    vein_strength: float
    palm_lines: tuple[tuple[float, float], ...]  # control-point offsets: heart, head, life, fate
    has_fate_line: bool
    crease_strength: float
    mark_contrast: float

    @property
    def id(self) -> str:
        """The 7-digit zero-padded id string of HandInfo.csv."""
        return f"{self.number:07d}"

    @property
    def nail_polish_flag(self) -> int:
        return int(self.nail_polish is not None)

    @property
    def skin_tone_name(self) -> str:
        return f"{self.skin_color} skin"

    def visible_marks(self, view: str) -> tuple[Mark, ...]:
        """The marks a photo of ``view`` ("dorsal" | "palmar") shows (drawing and captions agree).

        A mark is drawn on its own surface; a wrist scar wraps round and shows on both.
        """
        return tuple(m for m in self.marks
                     if m.surface == view or (m.region == "wrist" and m.kind == "scar"))

    def describe(self) -> list[str]:
        """Human-describable attributes, one phrase each (material for captions)."""
        g = self.geometry
        out = [f"{self.gender}", f"{self.age} years old", self.skin_tone_name]
        ratio = g.finger_lengths[1] / g.finger_lengths[3]
        long_fingers = g.finger_lengths[2] / g.palm_height > 0.82
        out.append("long fingers" if long_fingers else "short fingers")
        out.append("broad palm" if g.palm_width > 1.0 else "narrow palm")
        out.append("index finger longer than ring finger" if ratio > 1.0
                   else "ring finger longer than index finger")
        if self.nail_polish:
            out.append(f"{self.nail_polish} nail polish")
        else:
            out.append("unpolished nails")
        out.append(f"{self.nail_shape} nails")
        out.extend(m.describe() for m in self.marks)
        if self.wrinkle_strength > 0.55:
            out.append("pronounced knuckle wrinkles")
        if self.vein_strength > 0.55:
            out.append("visible veins")
        return out


def _sample_age(rng: np.random.Generator) -> int:
    if rng.random() < 0.85:
        return int(rng.integers(18, 31))
    return int(rng.integers(31, 76))


def make_person(number: int, seed: int = 0, difficulty: float = 0.5) -> SyntheticPerson:
    """The person with id ``number`` of the population ``seed`` at ``difficulty``.

    Higher difficulty draws identity cues closer to the population mean (more alike people) and
    makes marks fainter.
    """
    d = _check_difficulty(difficulty)
    rng = _rng(seed, _STREAM_PERSON, number)
    spread = 1.25 - 0.75 * d  # identity spread around the mean hand

    gender = "female" if rng.random() < 0.64 else "male"
    age = _sample_age(rng)
    skin_color = SKIN_COLORS[int(rng.choice(len(SKIN_COLORS), p=_SKIN_PROBS))]
    base = np.array(_SKIN_RGB[skin_color], float)
    lum = rng.normal(0.0, 0.05 * spread)
    hue = rng.normal(0.0, 1.0, 3) * np.array([6.0, 5.0, 7.0]) * spread
    skin = np.clip(base * (1.0 + lum) + hue, 30, 250)
    palm_mix = 0.35 + (0.25 if skin_color == "dark" else 0.0)
    palm = np.clip(skin * (1 - palm_mix) + np.array(_PALM_PINK) * palm_mix, 30, 252)

    male = gender == "male"
    size_f = 1.0 + (0.03 if male else -0.03)
    pw = float(np.clip(1.0 + rng.normal(0, 0.06 * spread) + (0.03 if male else -0.02), 0.82, 1.2))
    ph = float(np.clip(1.08 + rng.normal(0, 0.08 * spread), 0.85, 1.35))
    finger_scale = 1.0 + rng.normal(0, 0.07 * spread)
    lengths = tuple(
        float(np.clip(L * finger_scale * (1.0 + rng.normal(0, 0.06 * spread)), 0.4, 1.2))
        for L in _FINGER_LEN
    )
    wscale = 1.0 + rng.normal(0, 0.08 * spread) + (0.05 if male else -0.03)
    widths = tuple(
        float(np.clip(w * wscale * size_f * (1.0 + rng.normal(0, 0.05 * spread)), 0.12, 0.34))
        for w in _FINGER_WID
    )
    splay = tuple(float(a + rng.normal(0, 3.5 * spread)) for a in _FINGER_SPLAY)
    kdy = tuple(float(k + rng.normal(0, 0.025 * spread)) for k in _KNUCKLE_DY)
    joints = (
        float(np.clip(0.46 + rng.normal(0, 0.03 * spread), 0.38, 0.54)),
        float(np.clip(0.75 + rng.normal(0, 0.025 * spread), 0.68, 0.82)),
    )
    thumb_base = (
        float(-0.36 + rng.normal(0, 0.03 * spread)),
        float(0.30 + rng.normal(0, 0.05 * spread)),
    )
    geometry = HandGeometry(
        palm_width=pw,
        palm_height=ph,
        finger_lengths=lengths,
        finger_widths=widths,
        finger_splay=splay,
        knuckle_dy=kdy,
        joint_fractions=joints,
        thumb_base=thumb_base,
        wrist_width=float(np.clip(0.78 * pw + rng.normal(0, 0.04 * spread), 0.6, 1.0)),
    )

    polish_p = 0.28 if not male else 0.03
    nail_polish = None
    if rng.random() < polish_p:
        nail_polish = list(NAIL_POLISH_COLORS)[int(rng.integers(len(NAIL_POLISH_COLORS)))]
    nail_shape = NAIL_SHAPES[int(rng.integers(len(NAIL_SHAPES)))]
    nail_length = {"round": 0.01, "square": 0.02, "almond": 0.05, "short": -0.015}[nail_shape]
    nail_length = float(nail_length + abs(rng.normal(0, 0.012)) * (0 if male else 1))

    mark_contrast = 1.0 - 0.45 * d
    n_marks = int(np.clip(rng.poisson(2.2 - 0.6 * d), 1, 5))
    marks = tuple(_make_mark(rng, mark_contrast) for _ in range(n_marks))

    wr = tuple(int(rng.integers(1, 5)) for _ in range(5))
    n_veins = int(rng.integers(1, 4))
    x_wrist = np.sort(rng.uniform(-0.22, 0.22, n_veins))
    x_knuckle = np.sort(rng.uniform(-0.34, 0.34, n_veins))
    veins = tuple(
        (float(a), float(b), float(rng.normal(0, 0.07))) for a, b in zip(x_wrist, x_knuckle)
    )
    palm_lines = tuple(
        (float(rng.normal(0, 0.06 * spread)), float(rng.normal(0, 0.06 * spread))) for _ in range(4)
    )
    return SyntheticPerson(
        number=int(number),
        gender=gender,
        age=age,
        skin_color=skin_color,
        skin_rgb=tuple(int(round(v)) for v in skin),
        palm_rgb=tuple(int(round(v)) for v in palm),
        nail_shape=nail_shape,
        nail_length=nail_length,
        nail_polish=nail_polish,
        geometry=geometry,
        marks=marks,
        knuckle_wrinkles=wr,
        wrinkle_strength=float(rng.uniform(0.25, 0.9)),
        veins=veins,
        vein_strength=float(rng.uniform(0.2, 0.9)),
        palm_lines=palm_lines,
        has_fate_line=bool(rng.random() < 0.4),
        crease_strength=float(rng.uniform(0.35, 0.9)),
        mark_contrast=mark_contrast,
    )


def _make_mark(rng: np.random.Generator, contrast: float) -> Mark:
    kind = MARK_KINDS[int(rng.choice(4, p=(0.45, 0.2, 0.2, 0.15)))]
    r = rng.random()
    surface = "dorsal" if rng.random() < 0.6 else "palmar"
    if r < 0.45:
        region = "back of the hand" if surface == "dorsal" else "palm"
        pos = (float(rng.uniform(-0.34, 0.34)), float(rng.uniform(0.2, 0.9)))
    elif r < 0.55:
        region = "wrist"
        pos = (float(rng.uniform(-0.25, 0.25)), float(rng.uniform(-0.2, 0.02)))
    else:
        region = FINGERS[int(rng.integers(0, 5))]
        pos = (float(rng.uniform(0.15, 0.8)), float(rng.uniform(-0.5, 0.5)))
    angle = float(rng.uniform(0, 180))
    offsets: tuple[tuple[float, float], ...] = ()
    if kind == "mole":
        size = float(rng.uniform(0.028, 0.05))
        color = (72, 44, 34)
    elif kind == "freckles":
        size = float(rng.uniform(0.016, 0.024))
        color = (126, 78, 52)
        offsets = tuple(
            (float(rng.normal(0, 0.06)), float(rng.normal(0, 0.06)))
            for _ in range(int(rng.integers(4, 7)))
        )
    elif kind == "scar":
        size = float(rng.uniform(0.05, 0.1))  # half length
        color = (236, 196, 196)
    else:  # tattoo dots
        size = float(rng.uniform(0.018, 0.026))
        color = (38, 48, 86)
        pattern = int(rng.integers(3))
        if pattern == 0:  # line of three
            offsets = ((-0.06, 0.0), (0.0, 0.0), (0.06, 0.0))
        elif pattern == 1:  # triangle
            offsets = ((-0.05, -0.03), (0.05, -0.03), (0.0, 0.05))
        else:  # square
            offsets = ((-0.04, -0.04), (0.04, -0.04), (0.04, 0.04), (-0.04, 0.04))
    return Mark(kind, region, surface, pos, size, angle, color, offsets)


# --------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoParams:
    """Everything that varies between two photos of the same hand."""

    angle: float  # degrees, counter-clockwise
    scale: float
    shift: tuple[float, float]  # fraction of width/height
    spread: float  # finger spread multiplier
    finger_jitter: tuple[float, float, float, float, float]  # degrees
    thumb_abduction: float  # degrees
    brightness: float
    contrast: float
    cast: tuple[float, float, float]
    background: tuple[int, int, int]
    gradient: tuple[float, float]
    shadow: tuple[float, float]  # shadow offset in hand units
    blur: float  # Gaussian radius in output pixels
    noise: float  # noise std in 0..255 units


def sample_photo(rng: np.random.Generator, difficulty: float = 0.5) -> PhotoParams:
    """Draw the per-photo variation (always the same number of draws, in the same order)."""
    d = _check_difficulty(difficulty)
    u = rng.uniform
    rot = 3.0 + 10.0 * d
    sc = 0.03 + 0.05 * d
    sh = 0.015 + 0.03 * d
    spr = 0.1 + 0.25 * d
    angle = float(u(-rot, rot))
    scale = float(np.exp(u(-sc, sc)))
    shift = (float(u(-sh, sh)), float(u(-sh * 0.6, sh * 0.6)))
    spread = float(max(0.1, 1.0 + u(-spr, spr)))
    jitter = tuple(float(v) for v in rng.normal(0, 1.0 + 2.0 * d, 5))
    abduction = float(rng.normal(0, 3.0 + 6.0 * d))
    bright = float(u(-1, 1) * (0.03 + 0.07 * d))
    contrast = float(np.exp(u(-1, 1) * (0.04 + 0.1 * d)))
    cast = tuple(float(np.exp(v)) for v in rng.normal(0, 0.01 + 0.03 * d, 3))
    tint = rng.normal(0, 1, 3) * (3 + 12 * d) + u(-1, 1) * (4 + 12 * d)
    background = tuple(int(np.clip(232 + t, 60, 255)) for t in tint)
    gradient = (float(rng.normal(0, 0.02 + 0.06 * d)), float(rng.normal(0, 0.02 + 0.06 * d)))
    shadow = (float(u(-0.06, 0.06)), float(u(-0.08, 0.0)))
    blur = float(u(0.0, 0.2 + 0.4 * d))
    noise = float(u(1.5, 2.0 + 4.0 * d))
    return PhotoParams(angle, scale, shift, spread, jitter, abduction, bright, contrast, cast,
                       background, gradient, shadow, blur, noise)


class _Frame:
    """Maps hand units (dorsal right coordinates) to supersampled image pixels."""

    def __init__(self, center, unit, angle_deg, mirror):
        self.cx, self.cy = center
        self.unit = unit
        a = math.radians(angle_deg)
        self.ca, self.sa = math.cos(a), math.sin(a)
        self.mx = -1.0 if mirror else 1.0
        self.pivot = 0.6  # rotate about a point in the palm

    def __call__(self, pts) -> list[tuple[float, float]]:
        p = np.asarray(pts, float).reshape(-1, 2)
        x = p[:, 0] * self.mx
        y = p[:, 1] - self.pivot
        xr = x * self.ca - y * self.sa
        yr = x * self.sa + y * self.ca
        return list(zip((self.cx + xr * self.unit).tolist(), (self.cy - yr * self.unit).tolist()))


class _Finger:
    def __init__(self, base, angle_deg, length, width, joints):
        self.b = np.asarray(base, float)
        a = math.radians(angle_deg)
        self.d = np.array([math.sin(a), math.cos(a)])
        self.n = np.array([math.cos(a), -math.sin(a)])
        self.L = length
        self.w = width
        self.joints = joints
        self.tip_r = 0.41 * width

    def half_width(self, t):
        return 0.5 * self.w * (1.0 - 0.18 * np.clip(t, 0, 1))

    def point(self, t, s):
        """Point at fraction t along the axis and s in [-1, 1] across it."""
        t = np.asarray(t, float)
        s = np.asarray(s, float)
        return (self.b + (t * self.L)[..., None] * self.d
                + (s * self.half_width(t))[..., None] * self.n)

    def contour(self, start: float) -> np.ndarray:
        """Left side from t=start, round tip, right side back to t=start."""
        t_end = 1.0 - self.tip_r / self.L
        ts = np.linspace(start, t_end, 4)
        c = self.b + t_end * self.L * self.d
        hw = self.half_width(t_end)
        phis = np.linspace(math.pi, 0, 9)
        tip = (c[None] + np.cos(phis)[:, None] * hw * self.n[None]
               + np.sin(phis)[:, None] * max(self.tip_r, hw) * self.d[None])
        left = self.point(ts, -np.ones_like(ts))
        right = self.point(ts[::-1], np.ones_like(ts))
        return np.concatenate([left, tip, right])

    def outline(self) -> np.ndarray:
        """Closed polygon, reaching a little into the palm so it merges with it."""
        return self.contour(-0.14)

    def side_lines(self) -> np.ndarray:
        return self.contour(0.06)

    def across(self, t, extent=0.8, bow=0.0, n=5):
        """A line across the finger at t; ``bow`` (hand units) bends it towards the tip."""
        s = np.linspace(-extent, extent, n)
        pts = self.point(np.full_like(s, t), s)
        return pts + (bow * (1 - s ** 2))[:, None] * self.d[None]


def _quad_bezier(p0, p1, p2, n=9):
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, float)[None] for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _polygon_ellipse(center, rx, ry, angle_deg=0.0, n=16, power=2.0):
    phis = np.linspace(0, 2 * math.pi, n, endpoint=False)
    c, s = np.cos(phis), np.sin(phis)
    e = 2.0 / power
    x = rx * np.sign(c) * np.abs(c) ** e
    y = ry * np.sign(s) * np.abs(s) ** e
    a = math.radians(angle_deg)
    xr = x * math.cos(a) - y * math.sin(a)
    yr = x * math.sin(a) + y * math.cos(a)
    return np.stack([xr + center[0], yr + center[1]], 1)


_SUPERSAMPLE = 2


def render_image(
    person: SyntheticPerson,
    aspect: str,
    image_seed: int,
    difficulty: float = 0.5,
    size: tuple[int, int] = (160, 120),
    accessory: str | None = None,
    noise: bool = True,
) -> Image.Image:
    """Render one RGB photo (PIL image of ``size`` = (width, height)) of ``person``.

    ``aspect`` is one of :data:`ASPECTS`; ``accessory`` None or one of :data:`ACCESSORIES`.
    The photo's pose, lighting, background, blur and noise come from ``image_seed`` alone, so a
    left and a right hand rendered with the same seed are mirror images of each other
    (exactly so with ``noise=False``; sensor noise is added after mirroring).
    """
    return render_photo(person, aspect, image_seed, difficulty, size, accessory, noise)[0]


def render_photo(
    person: SyntheticPerson,
    aspect: str,
    image_seed: int,
    difficulty: float = 0.5,
    size: tuple[int, int] = (160, 120),
    accessory: str | None = None,
    noise: bool = True,
) -> tuple[Image.Image, str]:
    """:func:`render_image` plus the photo's caption (:func:`caption_for` of what was drawn)."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {list(ASPECTS)}, got {aspect!r}")
    if accessory is not None and accessory not in ACCESSORIES:
        raise ValueError(f"accessory must be None or one of {list(ACCESSORIES)}, got {accessory!r}")
    width, height = _check_size(size)
    d = _check_difficulty(difficulty)
    rng = np.random.default_rng(np.random.SeedSequence([_SALT, int(image_seed)]))
    photo = sample_photo(rng, d)
    view, side = aspect.split()
    arr, accessory_phrase = _draw_right_hand(person, view, photo, width, height, accessory, rng)
    if side == "left":
        arr = arr[:, ::-1]
    if noise:
        nrng = np.random.default_rng(np.random.SeedSequence([_SALT, int(image_seed), 7]))
        arr = arr + nrng.normal(0.0, photo.noise, arr.shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return image, caption_for(person, aspect, accessory_phrase)


def caption_phrases(person: SyntheticPerson, aspect: str,
                    accessory_phrase: str | None = None) -> list[str]:
    """The caption of one photo as phrases: the view first, then what the photo shows.

    Only what is visible goes in: nails (and their polish) are drawn on the dorsal side only,
    marks only on their own surface (:meth:`SyntheticPerson.visible_marks`). Proportions are
    included because they are visible and identity-specific; age is not (not drawn).
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {list(ASPECTS)}, got {aspect!r}")
    view, side = aspect.split()
    owner = "woman's" if person.gender == "female" else "man's"
    surface = "dorsal side" if view == "dorsal" else "palm side"
    g = person.geometry
    phrases = [f"a photo of the {surface} of a {owner} {side} hand", person.skin_tone_name]
    if view == "dorsal":
        phrases.append(f"{person.nail_polish} nail polish" if person.nail_polish
                       else "unpolished nails")
    phrases.append("long fingers" if g.finger_lengths[2] / g.palm_height > 0.82
                   else "short fingers")
    phrases.append("broad palm" if g.palm_width > 1.0 else "narrow palm")
    if accessory_phrase:
        phrases.append(accessory_phrase)
    phrases.extend(m.describe() for m in person.visible_marks(view))
    return phrases


def caption_for(person: SyntheticPerson, aspect: str, accessory_phrase: str | None = None) -> str:
    """One photo's caption, e.g. "a photo of the dorsal side of a woman's right hand, medium
    skin, red nail polish, long fingers, narrow palm, a gold ring on the ring finger, mole on
    the back of the hand" (phrases joined by ", ")."""
    return ", ".join(caption_phrases(person, aspect, accessory_phrase))


def _check_size(size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {size!r}") from None
    if width < 16 or height < 12:
        raise ValueError(
            f"image_size must be at least (16, 12) pixels (width, height), got {(width, height)}"
        )
    return width, height


def _draw_right_hand(person, view, photo, width, height, accessory, rng):
    """The noise-free photo of the right hand as float32 HxWx3 (0..255), and the caption
    phrase of the accessory drawn (None without one)."""
    ss = _SUPERSAMPLE
    W, H = width * ss, height * ss
    g = person.geometry
    unit = 0.38 * min(H, 0.75 * W) * photo.scale
    center = (W * (0.5 + photo.shift[0]), H * (0.58 + photo.shift[1]))
    frame = _Frame(center, unit, photo.angle, mirror=(view == "palmar"))
    dorsal = view == "dorsal"
    skin = person.skin_rgb if dorsal else person.palm_rgb
    px = lambda v: max(1, int(round(v * unit)))  # noqa: E731  hand units -> line width

    # ---- skeleton of this photo
    pw, ph = g.palm_width, g.palm_height
    fingers = []
    for i in range(1, 5):
        base = (_FINGER_BASE_X[i - 1] * pw * 0.98, ph + g.knuckle_dy[i - 1])
        ang = g.finger_splay[i] * photo.spread + photo.finger_jitter[i]
        fingers.append(
            _Finger(base, ang, g.finger_lengths[i], g.finger_widths[i], g.joint_fractions))
    t_ang = g.finger_splay[0] * (0.6 + 0.4 * photo.spread) + photo.thumb_abduction
    thumb = _Finger((g.thumb_base[0] * pw, g.thumb_base[1] * ph), t_ang,
                    g.finger_lengths[0] + 0.12, g.finger_widths[0], (0.42, 0.7))
    all_fingers = [thumb] + fingers  # indexed like FINGERS

    kd = g.knuckle_dy
    ww = g.wrist_width / 2
    palm = [
        (-ww, 0.0), (-0.47 * pw, 0.3 * ph), (-0.5 * pw, 0.62 * ph), (-0.49 * pw, ph + kd[0] - 0.06),
        (-0.25 * pw, ph + kd[0] + 0.02), (0.0, ph + 0.5 * (kd[1] + kd[2]) + 0.02),
        (0.25 * pw, ph + kd[2] + 0.01), (0.47 * pw, ph + kd[3] - 0.06),
        (0.5 * pw, 0.62 * ph), (0.46 * pw, 0.3 * ph), (ww, 0.0),
        (ww + 0.05, -1.6), (-ww - 0.05, -1.6),
    ]

    mask = Image.new("L", (W, H), 0)
    md = ImageDraw.Draw(mask)
    layer = Image.new("RGB", (W, H), skin)
    ld = ImageDraw.Draw(layer)
    md.polygon(frame(palm), fill=255)
    md.polygon(frame(_polygon_ellipse((g.thumb_base[0] * pw + 0.06, 0.3 * ph), 0.2, 0.26)),
               fill=255)
    for f in all_fingers:
        md.polygon(frame(f.outline()), fill=255)
    edge = _scale(skin, 0.82)
    for f in all_fingers:
        ld.line(frame(f.side_lines()), fill=edge, width=px(0.014))

    crease = _scale(skin, 1.0 - 0.3 * person.crease_strength)
    if dorsal:
        _draw_dorsal(person, ld, frame, fingers, thumb, skin, px)
    else:
        _draw_palmar(person, ld, frame, all_fingers, skin, crease, px)
    _draw_marks(person, view, ld, frame, all_fingers, skin, px)
    accessory_phrase = None
    if accessory is not None:
        accessory_phrase = _draw_accessory(accessory, view, ld, md, frame, fingers, g, rng, px)

    # ---- compose at output resolution
    mask = mask.reduce(ss)
    layer = layer.reduce(ss)
    m = np.asarray(mask, np.float32)[..., None] / 255.0
    hand = np.asarray(layer, np.float32)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.06 * unit / ss)), np.float32)
    shade = 0.78 + 0.22 * (soft[..., None] / 255.0)
    sx = int(round(photo.shadow[0] * unit / ss))
    sy = int(round(-photo.shadow[1] * unit / ss))
    shadow_img = mask.transform(mask.size, Image.AFFINE, (1, 0, -sx, 0, 1, -sy))
    shadow = np.asarray(shadow_img.filter(ImageFilter.GaussianBlur(0.08 * unit / ss)),
                        np.float32)[..., None] / 255.0
    bg = np.array(photo.background, np.float32)[None, None] * (1.0 - 0.22 * shadow)
    img = m * hand * shade + (1.0 - m) * bg

    # ---- camera: lighting, colour cast, gradient, blur (all before mirroring)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    grad = (1.0 + photo.gradient[0] * (xx / width - 0.5) * 2
            + photo.gradient[1] * (yy / height - 0.5) * 2)
    img = (img - 128.0) * photo.contrast + 128.0 + 255.0 * photo.brightness
    img = img * grad[..., None] * np.array(photo.cast, np.float32)[None, None]
    img = np.clip(img, 0, 255)
    if photo.blur > 0.05:
        blurred = Image.fromarray(np.rint(img).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(photo.blur))
        img = np.asarray(blurred, np.float32)
    return img.astype(np.float32), accessory_phrase


def _draw_dorsal(person, ld, frame, fingers, thumb, skin, px):
    g = person.geometry
    # veins on the back of the hand
    vein = _mix(skin, (92, 104, 150), 0.08 + 0.16 * person.vein_strength)
    for x0, x1, bend in person.veins:
        p0 = (x0 * g.palm_width, -0.1)
        p2 = (x1 * g.palm_width, 0.82 * g.palm_height)
        p1 = ((x0 + x1) / 2 * g.palm_width + bend, 0.4 * g.palm_height)
        ld.line(frame(_quad_bezier(p0, p1, p2)), fill=vein, width=px(0.032))
    # knuckle bumps (MCP): faint lighter arcs
    hi = _scale(skin, 1.06)
    for f in fingers:
        ld.line(frame(f.across(0.02, 0.55, bow=0.03)), fill=hi, width=px(0.02))
    # wrinkles over PIP and DIP joints
    wr = _scale(skin, 1.0 - 0.32 * person.wrinkle_strength)
    for f, n in zip([thumb] + fingers, person.knuckle_wrinkles):
        t1, t2 = f.joints
        for k in range(n):
            dt = (k - (n - 1) / 2) * 0.028 / f.L
            ld.line(frame(f.across(t1 + dt, 0.6, bow=0.025)), fill=wr, width=px(0.012))
        for k in range(max(1, n // 2)):
            dt = (k - (max(1, n // 2) - 1) / 2) * 0.025 / f.L
            ld.line(frame(f.across(t2 + dt, 0.5, bow=0.015)), fill=wr, width=px(0.011))
    # nails
    if person.nail_polish:
        nail = NAIL_POLISH_COLORS[person.nail_polish]
    else:
        nail = _mix(skin, (250, 218, 212), 0.45)
    nail_edge = _scale(skin, 0.75) if not person.nail_polish else _scale(nail, 0.8)
    for f in [thumb] + fingers:
        nl = 0.3 * f.L * (1 - f.joints[1]) + 0.07
        tip = f.L + person.nail_length
        c_t = (tip - nl / 2 - 0.02) / f.L
        c = f.point(c_t, 0.0)
        hw = 0.62 * f.half_width(1.0)
        power = {"round": 2.0, "square": 4.0, "almond": 1.6, "short": 2.6}[person.nail_shape]
        shape = _polygon_ellipse((0, 0), hw, nl / 2, 0.0, n=20, power=power)
        # orient: local y along the finger, x across
        pts = c[None] + shape[:, :1] * f.n[None] + shape[:, 1:] * f.d[None]
        ld.polygon(frame(pts), fill=nail, outline=nail_edge)


def _draw_palmar(person, ld, frame, all_fingers, skin, crease, px):
    g = person.geometry
    pw, ph = g.palm_width, g.palm_height
    pad = _scale(skin, 1.05)
    for f in all_fingers:
        t1, t2 = f.joints
        # finger pads (lighter ellipses on each phalanx)
        for a, b in ((t2, 1.0), (t1, t2)):
            c = f.point((a + b) / 2 + 0.02, 0.0)
            shape = _polygon_ellipse((0, 0), 0.55 * f.half_width(b), (b - a) * f.L * 0.36, n=12)
            pts = c[None] + shape[:, :1] * f.n[None] + shape[:, 1:] * f.d[None]
            ld.polygon(frame(pts), fill=pad)
        # flexion creases: double lines at the joints, single at the base
        for t in (t1, t2):
            for dt in (-0.012, 0.012):
                ld.line(frame(f.across(t + dt / f.L, 0.85, bow=0.0)), fill=crease, width=px(0.012))
        ld.line(frame(f.across(0.03, 0.8, bow=-0.01)), fill=crease, width=px(0.012))
    o = person.palm_lines
    w = px(0.018)
    # heart line: from the little-finger side towards the index/middle gap
    heart = _quad_bezier((0.5 * pw, 0.78 * ph + o[0][1]), (0.05 * pw, 0.72 * ph + o[0][0]),
                         (-0.22 * pw + o[0][0], 0.93 * ph))
    # head line: from the thumb/index gap across the palm
    head = _quad_bezier((-0.48 * pw, 0.7 * ph), (-0.05 * pw, 0.6 * ph + o[1][1]),
                        (0.36 * pw + o[1][0], 0.48 * ph + o[1][1]))
    # life line: arcs around the thumb ball
    life = _quad_bezier((-0.47 * pw, 0.7 * ph), (-0.06 * pw + o[2][0], 0.42 * ph + o[2][1]),
                        (-0.12 * pw + o[2][0], 0.04))
    for line in (heart, head, life):
        ld.line(frame(line), fill=crease, width=w)
    if person.has_fate_line:
        fate = _quad_bezier((0.02 * pw + o[3][0], 0.08), (0.05 * pw, 0.4 * ph),
                            (0.0 + o[3][1], 0.7 * ph))
        ld.line(frame(fate), fill=_mix(skin, crease, 0.7), width=px(0.012))
    # wrist creases
    for y in (-0.04, -0.1):
        ld.line(frame([(-0.3 * pw, y), (0.0, y - 0.02), (0.3 * pw, y)]), fill=crease,
                width=px(0.01))


def _mark_center(mark, all_fingers):
    if mark.region in FINGERS:
        f = all_fingers[FINGERS.index(mark.region)]
        return f.point(mark.pos[0], mark.pos[1]), f
    return np.asarray(mark.pos, float), None


def _draw_marks(person, view, ld, frame, all_fingers, skin, px):
    for mark in person.visible_marks(view):
        c, f = _mark_center(mark, all_fingers)
        color = _mix(skin, mark.color, float(np.clip(0.9 * person.mark_contrast, 0.2, 1.0)))
        a = math.radians(mark.angle)
        ax = np.array([math.cos(a), math.sin(a)])
        if mark.kind == "mole":
            ld.polygon(frame(_polygon_ellipse(c, mark.size, mark.size * 0.9, mark.angle, n=10)),
                       fill=color)
        elif mark.kind == "scar":
            pts = [c - ax * mark.size, c + ax * mark.size * 0.2 + np.array([0, 0.01]),
                   c + ax * mark.size]
            ld.line(frame(pts), fill=color, width=px(0.02))
        else:
            for ox, oy in mark.offsets:
                rot = (ox * ax[0] - oy * ax[1], ox * ax[1] + oy * ax[0])
                p = c + np.array(rot) * (0.7 if f is not None else 1.0)
                ld.polygon(frame(_polygon_ellipse(p, mark.size, mark.size, n=8)), fill=color)


def _draw_accessory(kind, view, ld, md, frame, fingers, g, rng, px) -> str:
    """Draw ``kind`` and return the caption phrase of what was drawn."""
    metal_name = "gold" if rng.random() < 0.5 else "silver"
    metal = _METALS[metal_name]
    if kind == "ring":
        which = int(rng.choice([0, 2, 2, 1]))  # index, ring (most often), middle
        f = fingers[which]
        t = 0.22
        band = np.concatenate([f.across(t - 0.05, 1.1), f.across(t + 0.05, 1.1)[::-1]])
        md.polygon(frame(band), fill=255)
        ld.polygon(frame(band), fill=metal, outline=_scale(metal, 0.7))
        return f"a {metal_name} ring on the {FINGERS[which + 1]}"
    strap = tuple(int(v) for v in rng.integers(20, 200, 3))
    ww = g.wrist_width / 2 + 0.05
    y0, y1 = -0.14, -0.3
    band = [(-ww, y0), (ww, y0), (ww, y1), (-ww, y1)]
    md.polygon(frame(band), fill=255)
    ld.polygon(frame(band), fill=metal if kind == "bracelet" else strap)
    if kind == "bracelet":
        for k in range(6):
            x = -ww + (k + 0.5) * 2 * ww / 6
            ld.line(frame([(x, y0), (x, y1)]), fill=_scale(metal, 0.75), width=px(0.012))
    elif view == "dorsal":
        face = _polygon_ellipse((0.0, (y0 + y1) / 2), 0.17, 0.15, n=14)
        ld.polygon(frame(face), fill=(236, 236, 232), outline=metal)
        ld.line(frame([(0.0, (y0 + y1) / 2), (0.06, (y0 + y1) / 2 + 0.06)]), fill=(20, 20, 20),
                width=px(0.012))
    else:
        ld.polygon(frame(_polygon_ellipse((0.0, (y0 + y1) / 2), 0.06, 0.05, n=8)), fill=metal)
    return f"a {metal_name} bracelet" if kind == "bracelet" else "a wristwatch"


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    rng_txt = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer {rng_txt}, got {value!r}")
    return int(value)


def _validate(subjects, images_per_subject, seed, difficulty, image_size, layout, accessory_rate,
              id_offset, distractors):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    _check_int("subjects", subjects, 2, 501 if layout == "hd" else None)
    _check_int("images_per_subject", images_per_subject, 2)
    _check_int("seed", seed, 0)
    _check_difficulty(difficulty)
    _check_size(image_size)
    try:
        rate_ok = 0.0 <= float(accessory_rate) <= 1.0
    except (TypeError, ValueError):
        rate_ok = False
    if not rate_ok:
        raise ValueError(f"accessory_rate must be in [0, 1], got {accessory_rate!r}")
    _check_int("id_offset", id_offset, 0, 10_000_000 - int(subjects))
    if distractors is not None:
        if layout != "hd":
            raise ValueError("distractors only applies to layout 'hd'")
        _check_int("distractors", distractors, 0, 211)


def _remove_stale(folder: Path, pattern: str, keep: set[str]) -> None:
    for p in folder.glob(pattern):
        if p.name not in keep and p.is_file():
            p.unlink()


def generate_dataset(
    root,
    subjects: int,
    images_per_subject: int,
    seed: int = 0,
    difficulty: float = 0.5,
    image_size: tuple[int, int] = (160, 120),
    layout: str = "11k",
    accessory_rate: float = 0.1,
    id_offset: int = 0,
    distractors: int | None = None,
    jpeg_quality: int = 92,
) -> Path:
    """Write a synthetic dataset under ``root`` and return ``root`` as a Path.

    ``layout="11k"``: ``root/Hands/Hand_%07d.jpg`` and ``root/HandInfo.csv``; person ids are
    ``id_offset .. id_offset+subjects-1``; ``images_per_subject`` photos per person AND aspect.
    ``accessory_rate`` is the chance that a photo shows a ring, bracelet or watch (flagged
    ``accessories=1``); at most ``images_per_subject - 2`` photos per person and aspect are
    flagged, so dropping them (MBA-Net protocol) leaves >= 2 per aspect.
    ``layout="hd"``: ``root/Original Images/1-501/<id>_<n>.jpg`` (dorsal right hands, ids
    1..subjects) and ``root/Original Images/502-712/<id>_<n>.jpg`` for ``distractors`` extra
    people (default ``max(2, subjects // 4)``); no CSV, no accessories. Person ``id`` is drawn
    as person number ``id_offset + id``.
    Stale images of an earlier run in the same folders are removed so files and labels agree.
    """
    _validate(subjects, images_per_subject, seed, difficulty, image_size, layout, accessory_rate,
              id_offset, distractors)
    subjects, k_img = int(subjects), int(images_per_subject)
    seed, id_offset = int(seed), int(id_offset)
    size = _check_size(image_size)
    root = Path(root)
    if layout == "11k":
        _write_11k(root, subjects, k_img, seed, float(difficulty), size, float(accessory_rate),
                   id_offset, jpeg_quality)
    else:
        m = max(2, subjects // 4) if distractors is None else int(distractors)
        _write_hd(root, subjects, k_img, seed, float(difficulty), size, id_offset, m, jpeg_quality)
    return root


def accessory_plan(seed: int, person_number: int, aspect: str | int, images_per_subject: int,
                   rate: float) -> list[str | None]:
    """Which photos of one person/aspect show an accessory (None = no accessory).

    Capped at ``images_per_subject - 2`` accessories (the last flagged photos are cleared).
    """
    a = ASPECTS.index(aspect) if isinstance(aspect, str) else int(aspect)
    plan: list[str | None] = []
    for k in range(images_per_subject):
        r = _rng(seed, _STREAM_ACCESSORY, person_number, a, k)
        u, kind = r.random(), ACCESSORIES[int(r.integers(len(ACCESSORIES)))]
        plan.append(kind if u < rate else None)
    excess = sum(p is not None for p in plan) - (images_per_subject - 2)
    for k in reversed(range(images_per_subject)):
        if excess <= 0:
            break
        if plan[k] is not None:
            plan[k] = None
            excess -= 1
    return plan


def _write_11k(root, subjects, k_img, seed, d, size, rate, id_offset, quality):
    hands = root / "Hands"
    hands.mkdir(parents=True, exist_ok=True)
    rows = []
    written = set()
    captions = []
    n = 0
    for i in range(subjects):
        number = id_offset + i
        person = make_person(number, seed, d)
        for a, aspect in enumerate(ASPECTS):
            plan = accessory_plan(seed, number, a, k_img, rate)
            for k in range(k_img):
                n += 1
                name = f"Hand_{n:07d}.jpg"
                img, caption = render_photo(person, aspect, image_seed(seed, number, a, k), d,
                                            size, accessory=plan[k])
                img.save(hands / name, "JPEG", quality=quality)
                written.add(name)
                captions.append((f"Hands/{name}", caption))
                rows.append([person.id, person.age, person.gender, person.skin_color,
                             int(plan[k] is not None), person.nail_polish_flag, aspect, name, 0])
    _remove_stale(hands, "Hand_*.jpg", written)
    with open(root / "HandInfo.csv", "w", newline="", encoding="utf-8") as fh:
        fh.write(",".join(HANDINFO_HEADER) + "\r\n")
        writer = csv.writer(fh, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
        writer.writerows(rows)
    _write_captions(root, captions)


def _write_captions(root: Path, captions: list[tuple[str, str]]) -> None:
    """``root/captions.csv``: image path relative to ``root``, caption (beside the dataset's own
    files, so the 11k/HD layouts and HandInfo.csv stay exactly as the real datasets')."""
    with open(root / CAPTIONS_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CAPTIONS_HEADER)
        writer.writerows(captions)


def _write_hd(root, subjects, k_img, seed, d, size, id_offset, m, quality):
    base = root / "Original Images"
    groups = [(base / "1-501", range(1, subjects + 1)), (base / "502-712", range(502, 502 + m))]
    captions = []
    for folder, ids in groups:
        folder.mkdir(parents=True, exist_ok=True)
        written = set()
        for pid in ids:
            number = id_offset + pid
            person = make_person(number, seed, d)
            for k in range(k_img):
                name = f"{pid}_{k + 1}.jpg"
                img, caption = render_photo(person, "dorsal right", image_seed(seed, number, 0, k),
                                            d, size)
                img.save(folder / name, "JPEG", quality=quality)
                written.add(name)
                captions.append((f"Original Images/{folder.name}/{name}", caption))
        _remove_stale(folder, "*_*.jpg", written)
    _write_captions(root, captions)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m handclip_nb.data.synthetic",
        description="Write a synthetic hands dataset in the 11k Hands (default) or HD layout.",
    )
    p.add_argument("--root", required=True, help="output folder")
    p.add_argument("--subjects", type=int, required=True, help="number of people (>= 2)")
    p.add_argument("--images-per-subject", type=int, required=True,
                   help="images per person and aspect (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="population/photo seed (>= 0)")
    p.add_argument("--difficulty", type=float, default=0.5,
                   help="0..1: per-photo variation and identity similarity (default 0.5)")
    p.add_argument("--width", type=int, default=160, help="image width in pixels (default 160)")
    p.add_argument("--height", type=int, default=120, help="image height in pixels (default 120)")
    p.add_argument("--layout", choices=LAYOUTS, default="11k", help="dataset layout")
    p.add_argument("--accessory-rate", type=float, default=0.1,
                   help="share of 11k photos with a ring/bracelet/watch (default 0.1)")
    p.add_argument("--id-offset", type=int, default=0,
                   help="first person id number (11k); a different offset = different people")
    p.add_argument("--distractors", type=int, default=None,
                   help="HD layout: people in 502-712 (default max(2, subjects // 4))")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    checks = [
        (args.subjects >= 2, f"--subjects must be >= 2, got {args.subjects}"),
        (args.images_per_subject >= 2,
         f"--images-per-subject must be >= 2, got {args.images_per_subject}"),
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (0.0 <= args.difficulty <= 1.0, f"--difficulty must be in [0, 1], got {args.difficulty}"),
        (args.width >= 16, f"--width must be >= 16, got {args.width}"),
        (args.height >= 12, f"--height must be >= 12, got {args.height}"),
        (0.0 <= args.accessory_rate <= 1.0,
         f"--accessory-rate must be in [0, 1], got {args.accessory_rate}"),
        (args.id_offset >= 0, f"--id-offset must be >= 0, got {args.id_offset}"),
    ]
    for ok, msg in checks:
        if not ok:
            parser.error(msg)
    t0 = time.perf_counter()
    try:
        root = generate_dataset(
            args.root, args.subjects, args.images_per_subject, seed=args.seed,
            difficulty=args.difficulty, image_size=(args.width, args.height), layout=args.layout,
            accessory_rate=args.accessory_rate, id_offset=args.id_offset,
            distractors=args.distractors,
        )
    except ValueError as exc:
        parser.error(str(exc))
    seconds = time.perf_counter() - t0
    if args.layout == "11k":
        n = args.subjects * len(ASPECTS) * args.images_per_subject
    else:
        m = max(2, args.subjects // 4) if args.distractors is None else args.distractors
        n = (args.subjects + m) * args.images_per_subject
    print(f"synthetic {args.layout}: wrote {n} images of {args.width}x{args.height} to {root} "
          f"in {seconds:.1f} s (seed {args.seed}, difficulty {args.difficulty})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
