"""Write sample_data/: small synthetic trading cards in every format the format policy knows.

Deterministic for a given Pillow/pillow-heif; run once (`make sample-data`) and commit the output.
After writing, it checks each file's verdict against the table below and writes sample_data/README.md.
The same files go to runner/demo/sample_data/, the copy that ships in the package for `ximrun demo`.
"""

from __future__ import annotations

import io
import random
import struct
import sys
import time
import zlib
from pathlib import Path

import pillow_heif
from PIL import Image, ImageDraw, ImageFont

from runner.images import check_bytes
from runner.job import ImagePolicy

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "sample_data"
SHIPPED = ROOT / "runner" / "demo" / "sample_data"  # byte-identical, tests/test_demo.py checks
W, H = 240, 336  # a 63 x 88 mm card, 5:7
MAX_BYTES = 100_000

# file -> (what the bytes are, the verdict under the default policy as "action reason")
EXPECTED = {
    "card_jpeg.jpg": ("JPEG with an Exif segment, no JFIF", "accept"),
    "card_jfif.jpg": ("JPEG/JFIF (APP0 JFIF segment)", "accept"),
    "card_copy.jpg": ("byte-identical copy of card_jpeg.jpg (answers are reused)", "accept"),
    "card_exif_rotated.jpg": ("JPEG stored sideways, EXIF orientation 6", "accept"),
    "card_png.png": ("PNG, RGBA with transparent rounded corners", "accept"),
    "card_webp.webp": ("WEBP (lossy)", "accept"),
    "card_bmp.bmp": ("BMP, 8-bit palette", "accept"),
    "card_tiff.tif": ("TIFF, deflate-compressed", "accept"),
    "card_heic.heic": ("HEIC (ftyp heic; mif1 heic miaf)", "accept"),
    "png_named.jpg": ("a PNG with a .jpg name: the content decides", "accept"),
    "anim.gif": ("animated GIF, 4 frames", "convert gif_first_frame"),
    "still.gif": ("single-frame GIF", "convert gif_first_frame"),
    "reject_avif.avif": ("AVIF (ftyp avif)", "reject unsupported_format:avif"),
    "reject_heif.heif": ("HEIF that is not HEIC: ftyp mif1 with only mif1 compatible",
                         "reject unsupported_format:heif"),
    "reject_jp2.jp2": ("JPEG 2000 (JP2 container)", "reject unsupported_format:jp2"),
    "reject_psd.psd": ("Photoshop PSD, RGB, RLE-compressed, no layers",
                       "reject unsupported_format:psd"),
    "reject_svg.svg": ("SVG drawing", "reject unsupported_format:svg"),
    "reject_pdf.pdf": ("PDF holding the card as a picture", "reject unsupported_format:pdf"),
    "broken_empty.jpg": ("0 bytes", "reject empty"),
    "broken_truncated.jpg": ("the first half of card_jpeg.jpg", "reject truncated"),
    "broken_corrupt.png": ("PNG whose image data (and its CRC) is damaged", "reject corrupt"),
    "broken_text.jpg": ("plain text with a .jpg name", "reject not_an_image"),
    "broken_bomb.png": ("PNG whose header claims 30000 x 30000 px (900 MP); under 1 KB on disk",
                        "reject too_large"),
}
TRANSCODED = {"reject_avif.avif", "reject_heif.heif", "reject_jp2.jp2", "reject_psd.psd"}

# (border, panel, art background): distinct dominant colours for every card.
PALETTES = {
    "jpeg": ((200, 40, 40), (250, 236, 200), (255, 180, 60)),
    "jfif": ((40, 90, 200), (220, 232, 250), (90, 170, 240)),
    "rotated": ((40, 150, 70), (226, 246, 220), (120, 200, 110)),
    "png": ((240, 200, 30), (252, 248, 220), (250, 120, 40)),
    "webp": ((120, 60, 170), (236, 224, 248), (190, 140, 230)),
    "bmp": ((30, 30, 30), (200, 200, 200), (110, 110, 110)),
    "tiff": ((0, 150, 160), (215, 245, 245), (60, 200, 190)),
    "heic": ((230, 110, 160), (250, 228, 238), (250, 170, 200)),
    "png_named": ((150, 100, 50), (240, 226, 205), (200, 160, 110)),
    "gif": ((250, 120, 0), (255, 240, 220), (255, 200, 120)),
    "avif": ((90, 110, 40), (236, 240, 210), (170, 190, 90)),
    "heif": ((60, 60, 120), (220, 220, 245), (130, 130, 210)),
    "jp2": ((170, 30, 90), (246, 216, 228), (220, 90, 140)),
    "psd": ((20, 110, 130), (212, 236, 240), (80, 170, 200)),
    "pdf": ((100, 100, 100), (245, 245, 245), (180, 180, 180)),
}
NAMES = {
    "jpeg": "Emberfox", "jfif": "Tidecaller", "rotated": "Mossback", "png": "Sunwing",
    "webp": "Duskmoth", "bmp": "Ironhide", "tiff": "Reefling", "heic": "Petalwisp",
    "png_named": "Burrowkin", "gif": "Blazetail", "avif": "Thornling", "heif": "Nightowl",
    "jp2": "Rubyfang", "psd": "Glacierfin", "pdf": "Stonewarden",
}


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_card(key: str, frame: int = 0) -> Image.Image:
    """A trading card: border, panel, name, artwork of simple shapes, an attack and a number."""
    border, panel, art = PALETTES[key]
    rng = random.Random(key)  # the same card every run, a different one per key
    im = Image.new("RGB", (W, H), border)
    d = ImageDraw.Draw(im)
    d.rounded_rectangle((8, 8, W - 9, H - 9), radius=10, fill=panel)
    d.text((18, 14), NAMES[key], font=font(18), fill=(25, 25, 25))
    d.text((W - 62, 17), f"HP {rng.randrange(4, 13) * 10}", font=font(14), fill=(160, 20, 20))
    d.rectangle((18, 40, W - 19, 190), fill=art, outline=(40, 40, 40), width=2)
    for _ in range(6):
        x, y = rng.randrange(24, W - 70), rng.randrange(46, 140)
        size = rng.randrange(20, 46)
        colour = tuple(rng.randrange(30, 230) for _ in range(3))
        shape = rng.choice(("ellipse", "rectangle", "triangle"))
        box = (x, y, x + size, y + size)
        if shape == "triangle":
            d.polygon([(x, y + size), (x + size // 2, y), (x + size, y + size)], fill=colour)
        else:
            getattr(d, shape)(box, fill=colour)
    # Animated frames move a white star across the artwork.
    sx = 30 + frame * 45
    d.regular_polygon((sx, 170, 12), 5, fill=(255, 255, 255), outline=(0, 0, 0))
    d.text((18, 200), f"{rng.choice(('Flame', 'Wave', 'Vine', 'Shadow'))} Strike", font=font(15),
           fill=(25, 25, 25))
    d.text((W - 50, 200), f"{rng.randrange(2, 9) * 10}", font=font(15), fill=(25, 25, 25))
    d.line((18, 222, W - 19, 222), fill=(120, 120, 120), width=1)
    d.multiline_text((18, 230), "Flip a coin. If heads,\nthis attack does 20\nmore damage.",
                     font=font(12), fill=(60, 60, 60), spacing=3)
    d.text((18, H - 32), f"No. {rng.randrange(1, 200):03d}/200", font=font(11), fill=(80, 80, 80))
    return im


def encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def strip_jfif(jpeg: bytes) -> bytes:
    """Drop the APP0 JFIF segment Pillow always writes, leaving an Exif-only JPEG."""
    assert jpeg[2:4] == b"\xff\xe0"
    length = struct.unpack(">H", jpeg[4:6])[0]
    return jpeg[:2] + jpeg[4 + length:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def packbits(row: bytes) -> bytes:
    """PackBits run-length encoding, as PSD's compression 1 stores each row."""
    out, i, n = bytearray(), 0, len(row)
    while i < n:
        run = 1
        while i + run < n and run < 128 and row[i + run] == row[i]:
            run += 1
        if run > 1:
            out += bytes((257 - run, row[i]))
            i += run
            continue
        start = i
        while i < n and i - start < 128 and (i + 1 >= n or row[i + 1] != row[i]):
            i += 1
        out += bytes((i - start - 1,)) + row[start:i]
    return bytes(out)


def make_psd(im: Image.Image) -> bytes:
    """A minimal Photoshop file: RGB, 8 bits, no resources or layers, RLE composite image."""
    w, h = im.size
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: empty
    rows = [packbits(ch.tobytes()[y * w:(y + 1) * w]) for ch in im.split() for y in range(h)]
    counts = b"".join(struct.pack(">H", len(r)) for r in rows)
    return header + sections + struct.pack(">H", 1) + counts + b"".join(rows)


def make_heif_not_heic(heic: bytes) -> bytes:
    """Re-brand a HEIC as generic HEIF: ftyp major mif1, compatible mif1 only.

    Item locations are absolute file offsets, so the file keeps its length: the ftyp box
    shrinks and a `free` box fills the gap.
    """
    size = struct.unpack(">I", heic[:4])[0]
    ftyp = struct.pack(">I", 20) + b"ftyp" + b"mif1" + b"\x00\x00\x00\x00" + b"mif1"
    free = struct.pack(">I", size - 20) + b"free" + b"\x00" * (size - 28)
    assert size - 20 >= 8
    return ftyp + free + heic[size:]


SVG = """<?xml version="1.0" encoding="UTF-8"?>
<!-- A trading card drawn as vectors: the API does not take SVG. -->
<svg xmlns="http://www.w3.org/2000/svg" width="240" height="336" viewBox="0 0 240 336">
  <rect width="240" height="336" rx="12" fill="#3c8c3c"/>
  <rect x="8" y="8" width="224" height="320" rx="10" fill="#eef6e6"/>
  <text x="18" y="30" font-family="sans-serif" font-size="18">Leafsprite</text>
  <rect x="18" y="40" width="204" height="150" fill="#9ed28c" stroke="#282828" stroke-width="2"/>
  <circle cx="120" cy="115" r="40" fill="#f0c828"/>
  <text x="18" y="215" font-family="sans-serif" font-size="15">Vine Strike 30</text>
</svg>
"""

TEXT = "This is a shopping list, not a picture.\neggs\nflour\n3 lemons\n"


def build() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    exif = Image.Exif()
    exif[0x0131] = "ximrun sample data"  # Software
    files["card_jpeg.jpg"] = strip_jfif(encode(draw_card("jpeg"), "JPEG", quality=85,
                                               exif=exif.tobytes()))
    files["card_jfif.jpg"] = encode(draw_card("jfif"), "JPEG", quality=85)
    files["card_copy.jpg"] = files["card_jpeg.jpg"]

    # Orientation 6: the viewer turns the stored (sideways) pixels 90 degrees clockwise.
    rotated = Image.Exif()
    rotated[0x0112] = 6
    files["card_exif_rotated.jpg"] = encode(draw_card("rotated").rotate(90, expand=True), "JPEG",
                                            quality=85, exif=rotated.tobytes())

    card = draw_card("png").convert("RGBA")
    mask = Image.new("L", card.size, 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, W - 1, H - 1), radius=14, fill=255)
    card.putalpha(mask)
    files["card_png.png"] = encode(card, "PNG", optimize=True)
    files["card_webp.webp"] = encode(draw_card("webp"), "WEBP", quality=80, method=6)
    files["card_bmp.bmp"] = encode(draw_card("bmp").quantize(64, dither=Image.Dither.NONE), "BMP")
    files["card_tiff.tif"] = encode(draw_card("tiff"), "TIFF", compression="tiff_adobe_deflate")
    files["card_heic.heic"] = encode(draw_card("heic"), "HEIF", quality=70)
    files["png_named.jpg"] = encode(draw_card("png_named"), "PNG", optimize=True)

    frames = [draw_card("gif", frame) for frame in range(4)]
    files["anim.gif"] = encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                               duration=250, loop=0)
    files["still.gif"] = encode(frames[0], "GIF")

    files["reject_avif.avif"] = encode(draw_card("avif"), "AVIF", quality=60)
    files["reject_heif.heif"] = make_heif_not_heic(encode(draw_card("heif"), "HEIF", quality=70))
    files["reject_jp2.jp2"] = encode(draw_card("jp2"), "JPEG2000", irreversible=True,
                                     quality_mode="rates", quality_layers=[8])
    files["reject_psd.psd"] = make_psd(draw_card("psd"))
    files["reject_svg.svg"] = SVG.encode()
    # A fixed date, or Pillow stamps the current time and every run would change the file.
    stamp = time.strptime("2026-01-01", "%Y-%m-%d")
    files["reject_pdf.pdf"] = encode(draw_card("pdf"), "PDF", resolution=96.0, title="Sample card",
                                     creationDate=stamp, modDate=stamp)

    files["broken_empty.jpg"] = b""
    files["broken_truncated.jpg"] = files["card_jpeg.jpg"][: len(files["card_jpeg.jpg"]) // 2]
    good = bytearray(files["png_named.jpg"])
    idat = good.index(b"IDAT") + 4
    good[idat:idat + 16] = b"\xde\xad\xbe\xef" * 4  # zlib header and first block; CRC now wrong
    files["broken_corrupt.png"] = bytes(good)
    files["broken_text.jpg"] = TEXT.encode()
    # A header that claims 900 megapixels over a little zlib data: never decode this far.
    files["broken_bomb.png"] = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * (30000 * 3 + 1) * 8, 9))
        + png_chunk(b"IEND", b"")
    )
    assert set(files) == set(EXPECTED)
    return files


def readme(files: dict[str, bytes]) -> str:
    lines = [
        "# sample_data",
        "",
        "Synthetic trading cards (and a few broken files), one per row of the format policy in",
        "docs/contract.md. Generated by `scripts/make_sample_data.py` (`make sample-data`); do not edit",
        "by hand: the script also checks that every file gets the verdict listed here.",
        "",
        "Verdicts are for the default policy (no `max_side`, nothing in `transcode`), as",
        "`ximrun check` reports them. With `transcode = [\"avif\", \"heif\", \"jp2\", \"psd\"]`",
        "the four `reject_` files of those formats become `convert transcode:<fmt>` and are sent",
        "as JPEG; SVG and PDF are always rejected.",
        "",
        "| file | bytes | what it is | verdict |",
        "| --- | ---: | --- | --- |",
    ]
    for name, (what, verdict) in EXPECTED.items():
        lines.append(f"| `{name}` | {len(files[name])} | {what} | {verdict} |")
    return "\n".join(lines) + "\n"


def verdict_text(data: bytes, policy: ImagePolicy) -> str:
    v = check_bytes(data, policy)
    return f"{v.action} {v.reason}" if v.reason else v.action


def main() -> int:
    pillow_heif.register_heif_opener()
    files = build()
    for out in (OUT, SHIPPED):
        out.mkdir(exist_ok=True)
    problems = []
    transcode = ImagePolicy(transcode=("avif", "heif", "jp2", "psd"))
    for name, data in files.items():
        for out in (OUT, SHIPPED):
            (out / name).write_bytes(data)
        if len(data) >= MAX_BYTES:
            problems.append(f"{name}: {len(data)} bytes, more than {MAX_BYTES}")
        got = verdict_text(data, ImagePolicy())
        if got != EXPECTED[name][1]:
            problems.append(f"{name}: expected {EXPECTED[name][1]!r}, got {got!r}")
        if name in TRANSCODED:
            fmt = name.split("_")[1].split(".")[0]
            got = verdict_text(data, transcode)
            if got != f"convert transcode:{fmt}":
                problems.append(f"{name}: with transcode, got {got!r}")
    for out in (OUT, SHIPPED):
        (out / "README.md").write_text(readme(files), encoding="utf-8")
    for name in sorted(files):
        print(f"{name:24s} {len(files[name]):7d}  {verdict_text(files[name], ImagePolicy())}")
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
