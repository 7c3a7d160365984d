"""Format sniffing and the format policy: accept, convert (GIF frame, resize, transcode) or reject.

Takes one image's bytes and returns what to upload (a PreparedImage) or why not (a reject Verdict).
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
from typing import Any

# Pillow's plugins for the formats sniffed here (`_DECODERS`) are loaded with this module, so that
# worker threads never race to register one lazily; the dozens of others (PDF, EPS, ICNS, ...) are
# never loaded: a preparation worker would otherwise import them all before its first image.
# HEIF (pillow-heif) is loaded with the first file that needs it (`_decoders`).
from PIL import (
    BmpImagePlugin,  # noqa: F401
    GifImagePlugin,  # noqa: F401
    Image,
    ImageOps,
    Jpeg2KImagePlugin,  # noqa: F401
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    PsdImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from runner.job import TRANSCODABLE, ImagePolicy
from runner.records import PreparedImage, Verdict

with contextlib.suppress(ImportError):
    from PIL import AvifImagePlugin  # noqa: F401 -- Pillow decodes AVIF itself from 11.3

_heif_lock = threading.Lock()
_heif_ready = False

SNIFF_BYTES = 4096  # how much of a file sniff_format needs to see

ACCEPTED = ("jpeg", "png", "webp", "bmp", "tiff", "heic")  # sent as they are (docs/contract.md)
JPEG_QUALITY = 90

# ISO-BMFF brands (ftyp box). Coding brands name the codec; structural brands only say "HEIF".
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_STRUCTURAL = frozenset({b"mif1", b"msf1"})
_HEIF_OTHER = frozenset({
    b"mif2", b"mif3", b"miaf", b"hevm", b"hevs", b"avci", b"avcs", b"jpeg", b"jpgs", b"j2ki",
    b"j2is", b"vvic", b"vvis", b"evbi", b"evbs", b"1pic", b"MiHA", b"MiHB", b"MiHE", b"MiPr",
})

_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"

# Pillow plugin ids that decode each format, in the order to try. A mif1-only HEIF may hold
# HEVC (pillow-heif) or AV1 (Pillow's AVIF plugin) pictures: only decoding tells which.
_DECODERS = {
    "jpeg": ("JPEG",),
    "png": ("PNG",),
    "webp": ("WEBP",),
    "bmp": ("BMP",),
    "tiff": ("TIFF",),
    "heic": ("HEIF",),
    "gif": ("GIF",),
    "avif": ("AVIF",),
    "heif": ("HEIF", "AVIF"),
    "jp2": ("JPEG2000",),
    "psd": ("PSD",),
}


def _decoders(fmt: str | None) -> list[str]:
    """Pillow's decoders for a sniffed format that this installation has."""
    if fmt in ("heic", "heif", "avif"):
        _load_heif()
    return [d for d in _DECODERS.get(fmt or "", ()) if d in Image.OPEN]


def _load_heif() -> None:
    """pillow-heif's openers, registered once, with the first file that may need them (without
    the package, HEIC has no decoder: prepare_image says so per image)."""
    global _heif_ready
    if _heif_ready:
        return
    with _heif_lock:
        if _heif_ready:
            return
        try:
            import pillow_heif
        except ImportError:
            pillow_heif = None
        else:
            pillow_heif.register_heif_opener()
        # Pillow decodes AVIF itself from 11.3; before that, pillow-heif < 1.0 could.
        if "AVIF" not in Image.OPEN and hasattr(pillow_heif, "register_avif_opener"):
            pillow_heif.register_avif_opener()
        _heif_ready = True


# --- sniffing ----------------------------------------------------------------------------------


def sniff_format(head: bytes) -> str | None:
    """Name the format of an image from its first bytes (at least 4096, or the whole file)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return _sniff_isobmff(head)
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if head.startswith(_JP2_SIGNATURE) or head.startswith(b"\xff\x4f\xff\x51"):
        return "jp2"
    if head[:4] == b"8BPS" and head[4:6] in (b"\x00\x01", b"\x00\x02"):
        return "psd"
    # Two letters are a weak signature: also require a known DIB header size.
    if head[:2] == b"BM" and len(head) >= 18:
        if struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES:
            return "bmp"
    # PDF readers accept the marker anywhere in the first 1024 bytes, so producers rely on it.
    if head.find(b"%PDF-", 0, 1024) >= 0:
        return "pdf"
    if _looks_like_svg(head):
        return "svg"
    return None


def _sniff_isobmff(head: bytes) -> str | None:
    """HEIC, AVIF or another HEIF, from the ftyp box's major and compatible brands."""
    if len(head) < 16:
        return None
    size = struct.unpack_from(">I", head, 0)[0]
    if size == 0:  # the box runs to the end of the file
        size = len(head)
    if size < 16:
        return None
    major = head[8:12]
    end = min(size, len(head))
    compatible = {head[i:i + 4] for i in range(16, end - 3, 4)}
    if major in _HEIC_BRANDS:
        return "heic"
    if major in _AVIF_BRANDS:
        return "avif"
    if major in _HEIF_STRUCTURAL:
        # mif1/msf1 say nothing about the codec; a compatible coding brand does, if unambiguous.
        heic, avif = compatible & _HEIC_BRANDS, compatible & _AVIF_BRANDS
        if heic and not avif:
            return "heic"
        if avif and not heic:
            return "avif"
        return "heif"
    if ({major} | compatible) & (_HEIC_BRANDS | _AVIF_BRANDS | _HEIF_STRUCTURAL | _HEIF_OTHER):
        return "heif"
    return None  # another ISO-BMFF file: MP4 or QuickTime video, a camera raw, ...


def _looks_like_svg(head: bytes) -> bool:
    """XML text whose first element, after the prolog, comments and doctype, is <svg>."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        head = head.decode("utf-16", errors="ignore").encode("utf-8")
    text = head.removeprefix(b"\xef\xbb\xbf")
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in b" \t\r\n":
            i += 1
        if text.startswith(b"<?", i):
            end = text.find(b"?>", i)
            i = -1 if end < 0 else end + 2
        elif text.startswith(b"<!--", i):
            end = text.find(b"-->", i)
            i = -1 if end < 0 else end + 3
        elif text[i:i + 9].upper() == b"<!DOCTYPE":
            # An internal subset [...] may itself contain '>'.
            bracket, close = text.find(b"[", i), text.find(b">", i)
            if 0 <= bracket < close:
                close = text.find(b"]", bracket)
                close = -1 if close < 0 else text.find(b">", close)
            i = -1 if close < 0 else close + 1
        else:
            break
        if i < 0:
            return False
    return text.startswith(b"<svg", i) and text[i + 4:i + 5] in (b" ", b"\t", b"\r", b"\n", b">", b"/")


# --- the policy --------------------------------------------------------------------------------


def decide(fmt: str | None, policy: ImagePolicy) -> Verdict:
    """The format policy table alone, without decoding anything."""
    if fmt is None:
        return Verdict("reject", None, "not_an_image")
    if fmt in ACCEPTED:
        return Verdict("accept", fmt)
    if fmt == "gif":
        return Verdict("convert", fmt, "gif_first_frame")
    if fmt in TRANSCODABLE and fmt in policy.transcode:
        return Verdict("convert", fmt, f"transcode:{fmt}")
    return Verdict("reject", fmt, f"unsupported_format:{fmt}")


def check_bytes(data: bytes, policy: ImagePolicy) -> Verdict:
    """What the policy does with these bytes: accept, convert (and why) or reject (and why)."""
    result = prepare_image(data, policy)
    return result.verdict if isinstance(result, PreparedImage) else result


def prepare_image(data: bytes, policy: ImagePolicy) -> PreparedImage | Verdict:
    """The bytes to upload for one image, or a reject Verdict; bad content never raises."""
    if not data:
        return Verdict("reject", None, "empty")
    fmt = sniff_format(data[:SNIFF_BYTES])
    verdict = decide(fmt, policy)
    if verdict.action == "reject":
        return verdict
    assert fmt is not None
    decoders = _decoders(fmt)
    if not decoders:
        return Verdict("reject", fmt, f"no_decoder:{fmt}")

    failure: Verdict | None = None
    for decoder in decoders:
        try:
            return _prepare(_File(data), decoder, data, fmt, verdict, policy)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
            return Verdict("reject", fmt, "too_large")
        except Exception:  # noqa: BLE001 -- why is found out below, on a second, watched try
            # Pillow's plugins raise many types on malformed input (OSError, SyntaxError,
            # struct.error, IndexError, ValueError, ...): for one image, each means "bad content".
            if failure is None:
                failure = Verdict("reject", fmt, _why(decoder, data, fmt, verdict, policy))
    return failure or Verdict("reject", fmt, "corrupt")


def _why(decoder: str, data: bytes, fmt: str, verdict: Verdict, policy: ImagePolicy) -> str:
    """Truncated or corrupt: the failed decode again, over a file that notes a short read
    (watching every read would slow every image: only failures pay for it)."""
    reader = _Reader(data)
    try:
        _prepare(reader, decoder, data, fmt, verdict, policy)
    except Exception as exc:  # noqa: BLE001 -- the failure being explained
        return _failure_reason(exc, reader, data)
    return "corrupt"  # it failed once and not twice: nothing to blame but the content


_File = io.BytesIO  # what a decoder reads the bytes through (its reads are C calls)


class _Reader(io.BytesIO):
    """A file over the bytes that remembers whether a decoder asked for more than there was."""

    short_read = False

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if size is not None and size > 0 and len(chunk) < size:
            self.short_read = True
        return chunk


def _failure_reason(exc: Exception, reader: _Reader, data: bytes) -> str:
    """Truncated (the data ends before the image does) or corrupt (anything else that is wrong)."""
    text = str(exc).lower()
    if reader.short_read or isinstance(exc, EOFError):
        return "truncated"
    if any(word in text for word in ("truncated", "end of file", "end of data")):
        return "truncated"
    # libwebp reads the whole buffer at once and only says it cannot decode; RIFF knows its length.
    if data[:4] == b"RIFF" and len(data) >= 8 and struct.unpack_from("<I", data, 4)[0] + 8 > len(data):
        return "truncated"
    return "corrupt"


def _prepare(
    reader: _Reader, decoder: str, data: bytes, fmt: str, verdict: Verdict, policy: ImagePolicy
) -> PreparedImage | Verdict:
    with Image.open(reader, formats=(decoder,)) as im:
        width, height = im.size  # from the header: nothing is decoded yet
        if width <= 0 or height <= 0:
            return Verdict("reject", fmt, "corrupt")
        if width * height > policy.max_pixels:
            return Verdict("reject", fmt, "too_large")
        resize = 0 < policy.max_side < max(width, height)
        if fmt == "jpeg":
            # Hand libjpeg the whole file in one call: Pillow otherwise feeds it 64 KB at a time
            # and retakes the GIL after each block, which beside a thread busy in Python slows a
            # large decode badly (bench/README.md has the figures).
            im.decodermaxblock = len(data)

        if verdict.action == "accept" and not resize:
            if fmt == "jpeg":
                # Decoding at 1/8 scale skips most of the IDCT work but still reads every
                # entropy-coded byte, so a truncated file is still caught.
                im.draft(im.mode, (1, 1))
            im.load()
            return PreparedImage(data, fmt, verdict, width, height)

        icc = im.info.get("icc_profile")
        if resize and fmt == "jpeg":
            # libjpeg scales by 1/2, 1/4 or 1/8 while decoding; draft never goes below the target.
            longer = max(width, height)
            im.draft(im.mode, (-(-width * policy.max_side // longer),
                               -(-height * policy.max_side // longer)))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        # 8-bit first: Pillow resizes palette images with nearest-neighbour only.
        frame = _to_8bit(im)
        if resize:
            # After draft the ratio left is under 2 for JPEG. Hamming costs what bilinear does
            # and is sharper; BOX is cheaper but renders small text blockier (bench/README.md).
            frame.thumbnail((policy.max_side, policy.max_side), Image.Resampling.HAMMING,
                            reducing_gap=2.0)
        # Encode before the with-block closes the file: closing also drops the pixels.
        return _convert(frame, fmt, verdict, icc)


def _convert(frame: Image.Image, fmt: str, verdict: Verdict, icc: bytes | None) -> PreparedImage:
    """Encode a decoded (and possibly resized) frame the way its verdict says."""
    if verdict.action == "accept":  # re-encoded only because of the resize
        sent = "png" if _translucent(frame) else "jpeg"
        verdict = Verdict("convert", fmt, "resize")
    elif fmt == "gif":
        sent = "png"
    else:
        # Transcoded formats go out as RGB JPEG, the one encoding every endpoint takes.
        sent = "jpeg"
        frame = _flatten(frame)
        if frame.mode != "RGB":
            frame = frame.convert("RGB")
    return PreparedImage(_encode(frame, sent, icc), sent, verdict, frame.width, frame.height)


# --- encoding ----------------------------------------------------------------------------------


def _to_8bit(im: Image.Image) -> Image.Image:
    """L, LA, RGB or RGBA: the modes both encoders take."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA") and "transparency" not in im.info:
        return im
    if mode.startswith("I") or mode == "F":
        # A plain convert("L") clips 16-bit values at 255; scale them instead.
        scale = 1 / 257 if im.getextrema()[1] > 255 else 1
        return im.convert("I").point(lambda v: v * scale).convert("L")
    if mode in ("1", "P", "La", "PA") or "transparency" in im.info:
        alpha = "A" in mode or "transparency" in im.info
        grey = mode in ("1", "L", "La")
        return im.convert(("LA" if alpha else "L") if grey else ("RGBA" if alpha else "RGB"))
    return im.convert("RGBA" if "A" in mode else "RGB")


def _translucent(im: Image.Image) -> bool:
    """True when some pixel is not fully opaque (many RGBA files are opaque throughout)."""
    return im.mode in ("LA", "RGBA") and im.getchannel("A").getextrema()[0] < 255


def _flatten(im: Image.Image) -> Image.Image:
    """Without alpha: translucent pixels composited onto white, as a viewer would show them."""
    if im.mode not in ("LA", "RGBA"):
        return im
    if not _translucent(im):
        return im.convert(im.mode[:-1])
    base = Image.new(im.mode[:-1], im.size, "white")
    base.paste(im.convert(base.mode), mask=im.getchannel("A"))
    return base


def _encode(im: Image.Image, fmt: str, icc: bytes | None) -> bytes:
    """JPEG (quality 90, alpha flattened onto white) or PNG (alpha kept when it matters)."""
    if fmt == "jpeg" or not _translucent(im):
        im = _flatten(im)
    # Keep the colour profile only when it still describes the pixels (RGB or grey); pass None
    # otherwise, or Pillow would copy a stale one (say, CMYK) from im.info.
    space = icc[16:20] if icc else b""
    if not ((space == b"RGB " and im.mode in ("RGB", "RGBA"))
            or (space == b"GRAY" and im.mode in ("L", "LA"))):
        icc = None
    buf = io.BytesIO()
    if fmt == "jpeg":
        im.save(buf, "JPEG", quality=JPEG_QUALITY, icc_profile=icc)
    else:
        im.save(buf, "PNG", icc_profile=icc)
    return buf.getvalue()


# --- thumbnails (ximrun report) ---------------------------------------------------------------

THUMBNAIL_QUALITY = 70


class ThumbnailError(Exception):
    """Why an image cannot be shown as a thumbnail (for a placeholder that says so)."""


def thumbnail(data: bytes, side: int, max_pixels: int,
              frame: tuple[int, int] | None = None) -> bytes:
    """A JPEG at most side x side of the image's first frame. `frame`: the (width, height) the
    API saw; the orientation (EXIF applied or not) that matches its shape is kept, so that boxes
    in its pixels fall in place. Raises ThumbnailError with the reason it cannot be made."""
    if not data:
        raise ThumbnailError("cannot be shown: empty")
    fmt = sniff_format(data[:SNIFF_BYTES])
    decoders = _decoders(fmt)
    if not decoders:
        raise ThumbnailError(f"cannot be shown: {'no decoder for ' + fmt if fmt else 'not an image'}")
    for decoder in decoders:
        try:
            with Image.open(io.BytesIO(data), formats=(decoder,)) as im:
                w, h = im.size
                if w <= 0 or h <= 0 or w * h > max_pixels:
                    raise ThumbnailError("cannot be shown: too large to decode")
                if fmt == "jpeg":
                    im.draft("RGB", (side, side))
                im.load()
                shown = ImageOps.exif_transpose(im)
                if frame and _aspect_off(shown.size, frame) > _aspect_off(im.size, frame):
                    shown = im
                shown = _rgb(shown)
                shown.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
                buf = io.BytesIO()
                shown.save(buf, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
                return buf.getvalue()
        except ThumbnailError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
            raise ThumbnailError("cannot be shown: too large to decode") from None
        except Exception:  # noqa: BLE001,S112 -- bad content: the next decoder, else the placeholder
            continue
    raise ThumbnailError(f"cannot be shown: the {fmt} data does not decode")


def _aspect_off(size: tuple[int, int], frame: tuple[int, int]) -> float:
    return abs(size[0] / max(size[1], 1) - frame[0] / max(frame[1], 1))


def _rgb(im: Any) -> Any:
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        back = Image.new("RGB", rgba.size, (255, 255, 255))
        back.paste(rgba, mask=rgba.getchannel("A"))
        return back
    if im.mode == "I;16" or im.mode == "I" or im.mode == "F":
        return im.point(lambda v: v / 256).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im
