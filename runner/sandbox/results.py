"""What the emulator answers about one image: decode it like the API would, then derive a result
from its real pixels, so the same pixels always get the same answer.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import pillow_heif
from PIL import Image, ImageChops, ImageStat

pillow_heif.register_heif_opener()
Image.init()  # load every plugin now: `formats=` below names plugins Pillow loads lazily

# The formats the API takes (docs/api-protocol.md); Pillow names JPEGs with an MPO segment "MPO".
# Anything else (AVIF, JPEG 2000, PSD, ...) is refused even though Pillow could decode it.
_ACCEPTED = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "HEIF")
                  if f in Image.OPEN)
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
# Past this the emulator calls the image a decompression bomb instead of decoding it.
MAX_PIXELS = 100_000_000
_WORK_SIDE = 256  # analysis runs on a thumbnail: answers stay fast and independent of the size
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class Service:
    """One emulated endpoint: what kind of answer it gives and how it is billed."""

    kind: str  # identify | tag | detect | grade | tagging | colors | ocr | removebg | upscale
    category: str = ""  # collectibles: the top Category tag of the object found
    billed_per_request: bool = False  # card grading: front and back of one card cost one charge


SERVICES: dict[str, Service] = {
    "collectibles/v2/tcg_id": Service("identify", "Card/Trading Card Game"),
    "collectibles/v2/sport_id": Service("identify", "Card/Sport Card"),
    "collectibles/v2/comics_id": Service("identify", "Comics"),
    "collectibles/v2/slab_id": Service("identify", "Slab"),
    "collectibles/v2/slab_grade": Service("grade", "Slab"),
    "collectibles/v2/process": Service("tag", "Card/Trading Card Game"),
    "collectibles/v2/analyze": Service("identify", "Card/Trading Card Game"),
    "collectibles/v2/detect": Service("detect"),
    "card-grader/v2/grade": Service("grade", "Card", billed_per_request=True),
    "card-grader/v2/condition": Service("grade", "Card"),
    "card-grader/v2/centering": Service("grade", "Card"),
    "tagging/fashion/v2/tags": Service("tagging"),
    "photo/tags/v2/tags": Service("tagging"),
    "tagging/homedecor/v2/tags": Service("tagging"),
    "dom_colors/generic/v2/dominantcolor": Service("colors"),
    "ocr/v2/read": Service("ocr"),
    "removebg/fast/removebg": Service("removebg"),
    "removebg/precise/removebg": Service("removebg"),
    "upscaler/2x/upscale": Service("upscale"),
    "upscaler/4x/upscale": Service("upscale"),
    "upscaler/8x/upscale": Service("upscale"),
}


@dataclass(frozen=True)
class Picture:
    """What the emulator learned from one image's pixels."""

    width: int  # as displayed (EXIF orientation applied)
    height: int
    digest: bytes  # sha256 of a 16x16 thumbnail: the pixels' identity
    bound_box: tuple[int, int, int, int]  # the non-background area, or the whole image
    colors: tuple[tuple[tuple[int, int, int], float], ...]  # top colours and their share
    brightness: float  # 0..255, mean luminance


def isobmff_is_heic(data: bytes) -> bool | None:
    """For an ISO-BMFF (HEIF family) file: whether it is HEIC; None if it is no such file.

    Decided by the major and compatible brands: `mif1` alone is a generic HEIF, `avif` is AVIF.
    """
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    end = min(max(size, 16), len(data), 4096)
    brands = {data[8:12]} | {data[i:i + 4] for i in range(16, end - 3, 4)}
    if brands & {b"avif", b"avis"}:
        return False
    return bool(brands & _HEIC_BRANDS)


def read_picture(data: bytes) -> Picture | None:
    """Decode and analyse an image as the API would; None means "Unable to load image"."""
    if isobmff_is_heic(data) is False:
        return None
    try:
        with warnings.catch_warnings():
            # Size is judged below by MAX_PIXELS; Pillow's own warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_ACCEPTED)
            if img.width * img.height > MAX_PIXELS:
                return None
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
            img.draft("RGB", (_WORK_SIDE, _WORK_SIDE))  # JPEG decodes at a reduced scale: fast
            img.load()
            work = _flatten(img)
    except Exception:  # noqa: BLE001 -- any failure to decode is the API's "Unable to load image"
        return None
    work.thumbnail((_WORK_SIDE, _WORK_SIDE))
    if orientation in _ORIENT:
        work = work.transpose(_ORIENT[orientation])
        if orientation >= 5:
            width, height = height, width
    return Picture(
        width=width,
        height=height,
        digest=hashlib.sha256(work.resize((16, 16), Image.Resampling.BOX).tobytes()).digest(),
        bound_box=_bound_box(work, width, height),
        colors=_dominant_colors(work),
        brightness=ImageStat.Stat(work.convert("L")).mean[0],
    )


def _flatten(img: Image.Image) -> Image.Image:
    """RGB, with any transparency laid on white (a transparent card is a card on white)."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _bound_box(work: Image.Image, width: int, height: int) -> tuple[int, int, int, int]:
    """The box around what differs from the corners' colour, scaled to the full image."""
    w, h = work.size
    corners = [work.getpixel(p) for p in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))]
    bg = tuple(sorted(c[i] for c in corners)[1] for i in range(3))  # type: ignore[index]
    diff = ImageChops.difference(work, Image.new("RGB", work.size, bg)).convert("L")
    box = diff.point(lambda v: 255 if v > 24 else 0).getbbox()
    if box is None or (box[2] - box[0]) * (box[3] - box[1]) < w * h // 100:
        return (0, 0, width, height)
    sx, sy = width / w, height / h
    return (int(box[0] * sx), int(box[1] * sy), min(width, round(box[2] * sx)),
            min(height, round(box[3] * sy)))


def _dominant_colors(work: Image.Image) -> tuple[tuple[tuple[int, int, int], float], ...]:
    small = work.resize((32, 32), Image.Resampling.BOX).quantize(
        colors=8, method=Image.Quantize.MEDIANCUT)
    palette = small.getpalette() or []
    counts = sorted(small.getcolors() or [], key=lambda c: (-c[0], c[1]))[:3]
    total = 32 * 32
    return tuple(((palette[3 * i], palette[3 * i + 1], palette[3 * i + 2]), n / total)
                 for n, i in counts)


# --- answers ---------------------------------------------------------------------------------

_NAMES = ("Ember Drake", "Tide Warden", "Moss Golem", "Storm Kestrel", "Iron Beetle",
          "Lumen Fox", "Frost Lynx", "Dune Serpent", "Thorn Knight", "Echo Moth",
          "Cinder Imp", "Coral Sprite", "Granite Ox", "Velvet Owl", "Quartz Hare", "Nova Whale")
_SETS = ("SBX1", "SBX2", "SBX3", "SBXP", "SBXM", "SBXA")
_NAMED_COLORS = {
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128),
    "red": (200, 30, 30), "orange": (240, 140, 20), "yellow": (235, 220, 40),
    "green": (40, 160, 60), "blue": (40, 80, 200), "purple": (130, 50, 160),
    "pink": (240, 150, 190), "brown": (120, 75, 40),
}


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def color_name(rgb: tuple[int, int, int]) -> str:
    return min(_NAMED_COLORS, key=lambda n: sum((a - b) ** 2 for a, b in
                                                zip(_NAMED_COLORS[n], rgb, strict=True)))


def _prob(digest: bytes, i: int, lo: float = 0.6) -> float:
    """A stable probability in [lo, 1) from one byte of the digest."""
    return round(lo + (1 - lo) * digest[i % len(digest)] / 256, 4)


def _card(digest: bytes, offset: int) -> dict[str, Any]:
    n = int.from_bytes(digest[offset:offset + 4], "big")
    return {"name": _NAMES[n % len(_NAMES)], "set_code": _SETS[(n >> 8) % len(_SETS)],
            "card_number": str((n >> 16) % 300 + 1)}


def _object(pic: Picture, service: Service) -> dict[str, Any]:
    return {"name": "Card", "id": pic.digest[:8].hex(), "bound_box": list(pic.bound_box),
            "prob": _prob(pic.digest, 0, 0.8),
            "_tags": {"Category": [{"name": service.category or "Card",
                                    "prob": _prob(pic.digest, 1, 0.9)}]}}


def answer(service: Service, pic: Picture) -> dict[str, Any]:
    """The service-specific keys of a successful record (besides `_id`, `_status`, size)."""
    d = pic.digest
    colors = [hex_color(rgb) for rgb, _ in pic.colors]
    labels = _labels(pic)
    if service.kind == "detect":
        return {"_objects": [{k: v for k, v in _object(pic, service).items() if k != "_tags"}]}
    if service.kind == "tag":
        return {"_objects": [_object(pic, service)], "dominant_colors": colors}
    if service.kind == "identify":
        obj = _object(pic, service)
        distances = sorted(round(0.05 + d[20 + i] / 512, 4) for i in range(3))
        obj["_identification"] = {"best_match": _card(d, 2),
                                  "alternatives": [_card(d, 6), _card(d, 10)],
                                  "distances": distances}
        return {"_objects": [obj], "dominant_colors": colors}
    if service.kind == "grade":
        parts = {k: round(5 + d[24 + i] % 11 / 2, 1)
                 for i, k in enumerate(("corners", "edges", "surface", "centering"))}
        final = round(min(parts.values()) * 2) / 2
        return {"_objects": [_object(pic, service)],
                "grades": {**parts, "final": final,
                           "condition": "Near Mint" if final >= 8 else "Played"}}
    if service.kind == "tagging":
        tags = [{"name": name, "prob": _prob(d, i, 0.5)} for i, name in enumerate(labels)]
        return {"_tags": {"Color": tags[:1], "Brightness": tags[1:2], "Shape": tags[2:]},
                "_tags_simple": labels, "best_label": tags[0]}
    if service.kind == "colors":
        return {"_dominant_colors": {
            "rgb_colors": [list(rgb) for rgb, _ in pic.colors],
            "rgb_hex_colors": colors,
            "percentages": [round(share, 4) for _, share in pic.colors],
            "color_names": [color_name(rgb) for rgb, _ in pic.colors]}}
    if service.kind == "ocr":
        text = f"{_card(d, 2)['name']} {_card(d, 2)['card_number']}"
        return {"_ocr": {"full_text": text, "lang_name": "english",
                         "texts": [{"text": text, "polygon": [], "prob": _prob(d, 5)}]}}
    if service.kind == "removebg":
        return {"_output_url": f"https://sandbox.invalid/removebg/{d.hex()[:32]}.png"}
    return {"_output_url": f"https://sandbox.invalid/upscale/{d.hex()[:32]}.png"}


def _labels(pic: Picture) -> list[str]:
    """Tags from what a glance tells: main colour, brightness, shape."""
    main = color_name(pic.colors[0][0]) if pic.colors else "gray"
    light = "dark" if pic.brightness < 85 else "bright" if pic.brightness > 170 else "medium"
    ratio = pic.width / pic.height
    shape = "portrait" if ratio < 0.9 else "landscape" if ratio > 1.1 else "square"
    return [main, light, shape]
