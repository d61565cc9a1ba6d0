"""Command line of the generator: ``python -m handclip_nb.data.synthetic --root DIR ...``.

``--photo-size 1600x1200`` (WIDTHxHEIGHT, like the real datasets' photos) sets the JPEG size; it
replaces ``--width``/``--height`` (giving both is an error unless they agree).
"""

from __future__ import annotations

import argparse
import re
import time

from .constants import ASPECTS, LAYOUTS, RENDER_CAP
from .writers import generate_dataset

__all__ = ["main"]

_SIZE_RE = re.compile(r"\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*")


def _photo_size(text: str) -> tuple[int, int]:
    """``"1600x1200"`` (also ``1600X1200``, ``1600\u00d71200``) -> ``(1600, 1200)``."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT in pixels, such as 1600x1200, got {text!r}")
    return int(m[1]), int(m[2])


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
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default 160)")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default 120)")
    p.add_argument("--photo-size", type=_photo_size, default=None, metavar="WIDTHxHEIGHT",
                   help="image size, e.g. 1600x1200 as the real photos (replaces --width/--height;"
                        " above {0}x{1} pixels the hand is drawn at that area and upscaled)"
                        .format(*RENDER_CAP))
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
    size_flag = "--width", "--height"
    if args.photo_size is not None:
        for flag, given, value in zip(size_flag, (args.width, args.height), args.photo_size):
            if given is not None and given != value:
                parser.error(f"{flag} {given} disagrees with --photo-size "
                             f"{args.photo_size[0]}x{args.photo_size[1]}; give one or the other")
        args.width, args.height = args.photo_size
        size_flag = "--photo-size width", "--photo-size height"
    args.width = 160 if args.width is None else args.width
    args.height = 120 if args.height is None else args.height
    checks = [
        (args.subjects >= 2, f"--subjects must be >= 2, got {args.subjects}"),
        (args.images_per_subject >= 2,
         f"--images-per-subject must be >= 2, got {args.images_per_subject}"),
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (0.0 <= args.difficulty <= 1.0, f"--difficulty must be in [0, 1], got {args.difficulty}"),
        (args.width >= 16, f"{size_flag[0]} must be >= 16, got {args.width}"),
        (args.height >= 12, f"{size_flag[1]} must be >= 12, got {args.height}"),
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
