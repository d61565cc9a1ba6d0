"""Command line of the generator: ``python -m handclip_nb.data.synthetic --root DIR ...``."""

from __future__ import annotations

import argparse
import time

from .constants import ASPECTS, LAYOUTS
from .writers import generate_dataset

__all__ = ["main"]


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
