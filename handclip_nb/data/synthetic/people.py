"""Synthetic people: identity cues drawn once per (seed, person number, difficulty).

:func:`make_person` draws a :class:`SyntheticPerson` (11k metadata plus hand geometry, skin,
nails, marks, wrinkles, veins and palm lines); :class:`Mark` and :class:`HandGeometry` are its
parts. Nothing here draws pixels (:mod:`.render`) or writes files (:mod:`.writers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constants import (
    _FINGER_LEN,
    _FINGER_SPLAY,
    _FINGER_WID,
    _KNUCKLE_DY,
    _PALM_PINK,
    _SKIN_PROBS,
    _SKIN_RGB,
    _STREAM_PERSON,
    FINGERS,
    MARK_KINDS,
    NAIL_POLISH_COLORS,
    NAIL_SHAPES,
    SKIN_COLORS,
    _check_difficulty,
    _rng,
)

__all__ = ["Mark", "HandGeometry", "SyntheticPerson", "make_person"]


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
