"""Benchmark: `images.prepare_image` on 12-megapixel JPEGs against a plain Pillow resize loop.

    python -m bench.bench_prepare [--images 3] [--rounds 3] [--max-side 1024]

The baseline is what anyone would write: open, convert("RGB"), thumbnail((1024, 1024)), save
as JPEG (quality 90, as ximrun encodes), in the same process on the same files. Goal: ximrun
3x faster. Also reported: the mean absolute difference of ximrun's pixels from the baseline's
(0-255 levels, averaged over channels), and how both scale from one thread to two (Pillow
releases the GIL while it decodes, resizes and encodes), next to the machine's own scaling:
SHA-256 of the same bytes, which runs without the GIL, on 1 thread and on 2.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

from bench.fixtures import Figure, all_met, print_figures

BENCH = "prepare"
GOAL = 3.0
SIZE = (4000, 3000)
QUALITY = 90


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = run(args)
    print_figures(figures, "\nprepare figures")
    return 0 if all_met(figures) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="photos to generate (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each photo is prepared by each method (default 3)")
    parser.add_argument("--max-side", type=int, default=1024, help="longest side after (1024)")
    return parser


def run(args: argparse.Namespace) -> list[Figure]:
    from runner.images import prepare_image
    from runner.job import ImagePolicy
    from runner.records import PreparedImage

    started = time.perf_counter()
    photos = [_photo(seed) for seed in range(args.images)]
    mb = sum(len(p) for p in photos) / len(photos) / 1e6
    print(f"prepare: {len(photos)} photos of {SIZE[0]}x{SIZE[1]} ({mb:.1f} MB each on average) "
          f"made in {time.perf_counter() - started:.1f} s; max_side {args.max_side}")
    policy = ImagePolicy(max_side=args.max_side)
    side = args.max_side

    def ximrun(data: bytes) -> bytes:
        out = prepare_image(data, policy)
        if not isinstance(out, PreparedImage):
            raise SystemExit(f"prepare: ximrun refused a generated photo: {out}")
        return out.data

    def plain(data: bytes) -> bytes:
        from PIL import Image

        with Image.open(BytesIO(data)) as im:
            rgb = im.convert("RGB")
        rgb.thumbnail((side, side))
        buf = BytesIO()
        rgb.save(buf, "JPEG", quality=QUALITY)
        return buf.getvalue()

    ximrun(photos[0])  # warm-up: codecs and plugins loaded before anything is timed
    plain(photos[0])
    times: dict[str, list[float]] = {"ximrun": [], "plain": []}
    for _ in range(args.rounds):
        # Rounds alternate, so that noise on the machine hits both alike; within a round one
        # method runs alone, so that the other's 36 MB frames do not churn its allocations.
        for name, fn in (("ximrun", ximrun), ("plain", plain)):
            for data in photos:
                t = time.perf_counter()
                fn(data)
                times[name].append(time.perf_counter() - t)
    x, p = statistics.median(times["ximrun"]), statistics.median(times["plain"])
    diff = statistics.mean(_mean_abs_diff(ximrun(d), plain(d)) for d in photos)

    tasks = photos * args.rounds
    scaling = {name: _thread_speed_up(fn, tasks) for name, fn in (("ximrun", ximrun),
                                                                   ("plain", plain))}
    scaling["machine (SHA-256)"] = _thread_speed_up(_sha256_many, tasks)
    print(f"\nper photo (median of {len(times['ximrun'])}): ximrun {x * 1000:.0f} ms, "
          f"plain Pillow {p * 1000:.0f} ms -> speed-up {p / x:.2f}x")
    print(f"mean absolute pixel difference, ximrun vs plain: {diff:.2f} levels of 255")
    for name, (one, two) in scaling.items():
        print(f"{name}: {len(tasks)} photos on 1 thread {one:.2f} s, on 2 threads {two:.2f} s "
              f"-> {one / two:.2f}x")
    return [
        Figure(BENCH, "speed-up vs plain Pillow", p / x, ".2f", f">= {GOAL:.1f}x", p / x >= GOAL),
        Figure(BENCH, "mean abs pixel difference", diff, ".2f", "(0-255)", None),
        Figure(BENCH, "ximrun 2 threads vs 1", scaling["ximrun"][0] / scaling["ximrun"][1],
               ".2f", "(max 2.0)", None),
        Figure(BENCH, "plain 2 threads vs 1", scaling["plain"][0] / scaling["plain"][1],
               ".2f", "(max 2.0)", None),
        Figure(BENCH, "machine 2 threads vs 1 (SHA-256)",
               scaling["machine (SHA-256)"][0] / scaling["machine (SHA-256)"][1], ".2f",
               "(max 2.0)", None),
    ]


def _thread_speed_up(fn: Callable[[bytes], bytes], tasks: list[bytes]) -> tuple[float, float]:
    """Seconds for all tasks on a pool of 1 thread, then of 2."""
    out = []
    for workers in (1, 2):
        with ThreadPoolExecutor(workers) as pool:
            t = time.perf_counter()
            list(pool.map(fn, tasks))
            out.append(time.perf_counter() - t)
    return out[0], out[1]


def _sha256_many(data: bytes) -> bytes:
    """About as long as preparing a photo, all of it without the GIL."""
    for _ in range(20):
        digest = hashlib.sha256(data).digest()
    return digest


def _mean_abs_diff(a: bytes, b: bytes) -> float:
    from PIL import Image, ImageChops, ImageStat

    with Image.open(BytesIO(a)) as ia, Image.open(BytesIO(b)) as ib:
        ia, ib = ia.convert("RGB"), ib.convert("RGB")
    if ia.size != ib.size:  # a pixel of rounding apart: compare at the baseline's size
        ia = ia.resize(ib.size, Image.Resampling.LANCZOS)
    return statistics.mean(ImageStat.Stat(ImageChops.difference(ia, ib)).mean)


def _photo(seed: int) -> bytes:
    """A 12-megapixel JPEG that compresses like a photo: gradients, soft shapes, sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    w, h = SIZE
    small = (w // 8, h // 8)
    channels = [Image.linear_gradient("L").rotate(rng.uniform(0, 360)).resize(small),
                Image.radial_gradient("L").resize(small),
                Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize(small)]
    im = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        x, y = rng.randrange(small[0]), rng.randrange(small[1])
        r = rng.randrange(5, small[0] // 4)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice((draw.ellipse, draw.rectangle))
        shape((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(2)).resize(SIZE, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(200):  # sharp detail at full resolution: edges, lines, text-like strokes
        x, y = rng.randrange(w), rng.randrange(h)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.line((x, y, x + rng.randrange(-400, 400), y + rng.randrange(-400, 400)),
                  fill=colour, width=rng.randrange(1, 6))
    noise = Image.merge("RGB", [Image.effect_noise(SIZE, 48) for _ in range(3)])
    im = Image.blend(im, noise, 0.12)
    buf = BytesIO()
    im.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
