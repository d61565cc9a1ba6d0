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
    both: ROOT/handclip_synthetic.json  the provenance record (:data:`SYNTHETIC_PROVENANCE_FILE`):
          the data is synthetic, and the generator's arguments (no time, so still byte-identical)

CLI::

    python -m handclip_nb.data.synthetic --root DIR --subjects N --images-per-subject K --seed S
    python -m handclip_nb.data.synthetic ... --photo-size 1600x1200     # the real photos' size

Photo size: ``image_size=(width, height)`` (CLI ``--width/--height`` or ``--photo-size WxH``),
default 160x120. Up to the area of :data:`RENDER_CAP` (400x300) the hand is drawn at that size;
above it (the real 1600x1200) it is drawn at the cap's area with the photo's aspect ratio,
upscaled bicubic, and the sensor noise is added at full resolution, so real-size JPEGs (~150-350
KB, full-size decoding) cost ~0.1 s each instead of ~1 s. A left hand stays the exact mirror of
the right one before noise at every size.

Determinism: every person is generated from (seed, person number) and every photo from
(seed, person number, aspect, image index), so the same arguments give byte-identical CSVs and
identical pixels, and changing ``--images-per-subject`` does not change who the people are.
``difficulty`` in [0, 1] (default 0.5) raises the per-photo variation and makes people more alike;
it is part of a person's recipe (the same seed at another difficulty gives related, not identical,
people).

Modules: :mod:`.constants` (values mirroring the real datasets, seed streams), :mod:`.people`
(who a person is), :mod:`.render` (one photo of a person), :mod:`.captions` (the caption of
one photo), :mod:`.writers` (datasets on disk), :mod:`.cli` (the command line, run by
``__main__``).
"""

from ..captions import CAPTIONS_FILE  # the captions.csv reader's file name (not .captions)
from ..provenance import SYNTHETIC_PROVENANCE_FILE  # read by data.provenance, written here
from .captions import caption_for, caption_phrases
from .cli import main
from .constants import (
    ACCESSORIES,
    ASPECTS,
    HANDINFO_HEADER,
    NAIL_POLISH_COLORS,
    RENDER_CAP,
    SKIN_COLORS,
    image_seed,
)
from .people import HandGeometry, Mark, SyntheticPerson, make_person
from .render import PhotoParams, render_image, render_photo, sample_photo
from .writers import accessory_plan, generate_dataset

__all__ = [
    "ASPECTS",
    "HANDINFO_HEADER",
    "SKIN_COLORS",
    "NAIL_POLISH_COLORS",
    "ACCESSORIES",
    "RENDER_CAP",
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
    "SYNTHETIC_PROVENANCE_FILE",
    "accessory_plan",
    "generate_dataset",
    "main",
]
