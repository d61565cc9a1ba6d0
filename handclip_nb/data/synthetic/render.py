"""Photos of synthetic people: per-photo variation, drawing helpers and the renderer.

:func:`sample_photo` draws a :class:`PhotoParams` (pose, lighting, background, blur, noise);
:func:`render_photo` draws the right hand of a :class:`~.people.SyntheticPerson` at 2x
supersampling, mirrors it for a left hand, adds sensor noise and returns the picture with its
caption (:func:`.captions.caption_for`).

Real-size photos: a ``size`` whose area exceeds :data:`~.constants.RENDER_CAP` (400x300) is
drawn at that area with the same aspect ratio (1600x1200 -> 400x300), upscaled bicubic to
``size``, mirrored for a left hand and only then given sensor noise at full resolution (from the
photo's own noise stream), so a 1600x1200 photo is a smooth camera-like picture with a real
JPEG's size and decoding cost, at ~0.1 s instead of ~1 s. Sizes up to the cap (the default
160x120 included) are drawn directly, exactly as before.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .captions import caption_for
from .constants import (
    _FINGER_BASE_X,
    _METALS,
    _SALT,
    ACCESSORIES,
    ASPECTS,
    FINGERS,
    NAIL_POLISH_COLORS,
    RENDER_CAP,
    _check_difficulty,
)
from .people import SyntheticPerson

__all__ = ["PhotoParams", "sample_photo", "render_image", "render_photo"]


def _mix(c1, c2, t: float) -> tuple[int, int, int]:
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c1, c2))


def _scale(c, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(a * f)))) for a in c)


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
    draw_w, draw_h = _draw_size(width, height)
    arr, accessory_phrase = _draw_right_hand(person, view, photo, draw_w, draw_h, accessory, rng)
    nrng = np.random.default_rng(np.random.SeedSequence([_SALT, int(image_seed), 7]))
    if (draw_w, draw_h) != (width, height):  # above the cap: upscale, mirror, then noise
        image = Image.fromarray(np.rint(arr).astype(np.uint8), "RGB").resize(
            (width, height), Image.Resampling.BICUBIC)
        if side == "left":
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if noise:
            image = _add_sensor_noise(image, photo.noise, nrng)
        return image, caption_for(person, aspect, accessory_phrase)
    if side == "left":
        arr = arr[:, ::-1]
    if noise:
        arr = arr + nrng.normal(0.0, photo.noise, arr.shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return image, caption_for(person, aspect, accessory_phrase)


def _draw_size(width: int, height: int) -> tuple[int, int]:
    """The size the hand is drawn at: ``(width, height)`` itself up to the area of
    :data:`RENDER_CAP`, else that area with the same aspect ratio (1600x1200 -> 400x300)."""
    cap = RENDER_CAP[0] * RENDER_CAP[1]
    if width * height <= cap:
        return width, height
    f = math.sqrt(cap / (width * height))
    return max(16, int(round(width * f))), max(12, int(round(height * f)))


_NOISE_LEVELS = 1 << 16


@functools.lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
    """Standard normal quantiles at the midpoints of 2**16 equal-probability bins."""
    nd = statistics.NormalDist()
    return np.array([nd.inv_cdf((i + 0.5) / _NOISE_LEVELS) for i in range(_NOISE_LEVELS)])


def _add_sensor_noise(image: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    """``image`` plus Gaussian noise of ``std`` (0..255 units) in every pixel and channel.

    Drawn by inverse CDF from 16-bit uniforms (tails to 4.3 std) and rounded before adding,
    which on a uint8 picture is the same as rounding after: ~4x cheaper than ``rng.normal`` at
    1600x1200 (5.8 M draws), where it would be the largest cost of a photo.
    """
    idx = rng.integers(0, _NOISE_LEVELS, size=(image.height, image.width, 3), dtype=np.uint16)
    table = np.rint(std * _normal_quantiles()).astype(np.int16)
    out = np.asarray(image, np.int16) + table[idx]
    np.clip(out, 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8), "RGB")


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
