"""The format policy: sniffing, accept/convert/reject verdicts, GIF frames, resize and transcode."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageOps, ImageStat, JpegImagePlugin

from runner import images
from runner.images import check_bytes, decide, prepare_image, sniff_format
from runner.job import ImagePolicy
from runner.records import PreparedImage, Verdict

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
DEFAULT = ImagePolicy()
TRANSCODE_ALL = ImagePolicy(transcode=("avif", "heif", "jp2", "psd"))

# sample file -> (sniffed format, action, reason) under the default policy
SAMPLE_VERDICTS = {
    "card_jpeg.jpg": ("jpeg", "accept", None),
    "card_jfif.jpg": ("jpeg", "accept", None),
    "card_copy.jpg": ("jpeg", "accept", None),
    "card_exif_rotated.jpg": ("jpeg", "accept", None),
    "card_png.png": ("png", "accept", None),
    "card_webp.webp": ("webp", "accept", None),
    "card_bmp.bmp": ("bmp", "accept", None),
    "card_tiff.tif": ("tiff", "accept", None),
    "card_heic.heic": ("heic", "accept", None),
    "png_named.jpg": ("png", "accept", None),
    "anim.gif": ("gif", "convert", "gif_first_frame"),
    "still.gif": ("gif", "convert", "gif_first_frame"),
    "reject_avif.avif": ("avif", "reject", "unsupported_format:avif"),
    "reject_heif.heif": ("heif", "reject", "unsupported_format:heif"),
    "reject_jp2.jp2": ("jp2", "reject", "unsupported_format:jp2"),
    "reject_psd.psd": ("psd", "reject", "unsupported_format:psd"),
    "reject_svg.svg": ("svg", "reject", "unsupported_format:svg"),
    "reject_pdf.pdf": ("pdf", "reject", "unsupported_format:pdf"),
    "broken_empty.jpg": (None, "reject", "empty"),
    "broken_truncated.jpg": ("jpeg", "reject", "truncated"),
    "broken_corrupt.png": ("png", "reject", "corrupt"),
    "broken_text.jpg": (None, "reject", "not_an_image"),
    "broken_bomb.png": ("png", "reject", "too_large"),
}
ACCEPTED_SAMPLES = [n for n, (_, action, _) in SAMPLE_VERDICTS.items() if action == "accept"]


def sample(name: str) -> bytes:
    return (SAMPLE / name).read_bytes()


def encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00\x00\x00\x08free"


def picture(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """An RGB picture with structure (a gradient and a block) so orientation is visible."""
    im = Image.merge("RGB", [Image.linear_gradient("L").resize(size)] * 2
                     + [Image.linear_gradient("L").rotate(90).resize(size)])
    w, h = size
    ImageDraw.Draw(im).rectangle((0, 0, w // 4, h // 4), fill=(255, 0, 0))
    return im


def prepared(data: bytes, policy: ImagePolicy = DEFAULT) -> PreparedImage:
    result = prepare_image(data, policy)
    assert isinstance(result, PreparedImage), result
    return result


# --- sniffing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, pil, options", [
    ("jpeg", "JPEG", {}),
    ("png", "PNG", {}),
    ("webp", "WEBP", {}),
    ("bmp", "BMP", {}),
    ("tiff", "TIFF", {}),
    ("tiff", "TIFF", {"big_tiff": True}),
    ("gif", "GIF", {}),
    ("avif", "AVIF", {}),
    ("heic", "HEIF", {}),
    ("jp2", "JPEG2000", {}),
    ("jp2", "JPEG2000", {"no_jp2": True}),  # a raw J2K codestream
    ("pdf", "PDF", {}),
])
def test_sniff_names_the_format_pillow_wrote(fmt: str, pil: str, options: dict) -> None:
    assert sniff_format(encode(picture(), pil, **options)[:4096]) == fmt


@pytest.mark.parametrize("major, compatible, expected", [
    (b"heic", (b"mif1", b"heic"), "heic"),
    (b"heix", (b"mif1",), "heic"),
    (b"heim", (), "heic"),
    (b"mif1", (b"mif1", b"heic", b"miaf"), "heic"),
    (b"msf1", (b"msf1", b"hevc"), "heic"),
    (b"heic", (b"mif1", b"avif"), "heic"),  # the major brand decides
    (b"avif", (b"avif", b"mif1", b"miaf", b"MA1B"), "avif"),
    (b"avis", (b"msf1",), "avif"),
    (b"mif1", (b"mif1", b"avif"), "avif"),
    (b"mif1", (), "heif"),  # mif1 alone says nothing about the codec
    (b"mif1", (b"mif1", b"miaf"), "heif"),
    (b"msf1", (b"msf1",), "heif"),
    (b"mif1", (b"heic", b"avif"), "heif"),  # ambiguous
    (b"miaf", (b"mif1",), "heif"),
    (b"avci", (b"mif1",), "heif"),
    (b"isom", (b"isom", b"mp42"), None),  # an MP4 video
    (b"qt  ", (), None),
])
def test_sniff_heif_family_by_major_and_compatible_brands(
        major: bytes, compatible: tuple[bytes, ...], expected: str | None) -> None:
    assert sniff_format(ftyp(major, *compatible)) == expected


@pytest.mark.parametrize("text", [
    b'<svg xmlns="http://www.w3.org/2000/svg"/>',
    b'\xef\xbb\xbf  \n<?xml version="1.0"?>\n<!-- made by hand -->\n<svg width="1">',
    b'<?xml version="1.0"?><!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
    b'"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd"><svg>',
    b'<!DOCTYPE svg [ <!ENTITY a "b>"> ]>\n<svg\n>',
    '<?xml version="1.0" encoding="UTF-16"?><svg/>'.encode("utf-16"),
])
def test_sniff_recognises_svg_after_bom_prolog_comments_and_doctype(text: bytes) -> None:
    assert sniff_format(text) == "svg"


@pytest.mark.parametrize("head, expected", [
    (b"8BPS\x00\x01" + b"\x00" * 20, "psd"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 ", "jp2"),
    (b"\xff\x4f\xff\x51\x00\x2f", "jp2"),
    (b"%PDF-1.7\n", "pdf"),
    (b"<html><body><svg></svg></body></html>", None),  # SVG inside HTML is not an SVG file
    (b"<svgfoo/>", None),
    (b"BM this is text, not a bitmap header", None),
    (b"hello world", None),
    (b"", None),
    (b"\xff\xd8", None),  # too short to be a JPEG
])
def test_sniff_signatures_and_near_misses(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected


def test_sniff_needs_only_the_first_4096_bytes() -> None:
    for name in SAMPLE_VERDICTS:
        data = sample(name)
        assert sniff_format(data[:4096]) == sniff_format(data)


def test_the_file_name_is_never_trusted() -> None:
    png = prepared(sample("png_named.jpg"))
    assert png.format == "png" and png.verdict == Verdict("accept", "png")
    assert check_bytes(sample("broken_text.jpg"), DEFAULT) == Verdict("reject", None, "not_an_image")


# --- the policy table --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "bmp", "tiff", "heic"])
def test_decide_accepts_what_the_api_takes(fmt: str) -> None:
    assert decide(fmt, DEFAULT) == Verdict("accept", fmt)


@pytest.mark.parametrize("fmt", ["avif", "jp2", "psd", "svg", "pdf", "heif"])
def test_decide_rejects_other_formats_by_name(fmt: str) -> None:
    assert decide(fmt, DEFAULT) == Verdict("reject", fmt, f"unsupported_format:{fmt}")


@pytest.mark.parametrize("fmt", ["avif", "jp2", "psd", "heif"])
def test_decide_converts_formats_listed_in_transcode(fmt: str) -> None:
    assert decide(fmt, ImagePolicy(transcode=(fmt,))) == Verdict("convert", fmt, f"transcode:{fmt}")
    assert decide(fmt, ImagePolicy(transcode=("psd" if fmt != "psd" else "jp2",))).action == "reject"


def test_decide_gif_and_unknown() -> None:
    assert decide("gif", DEFAULT) == Verdict("convert", "gif", "gif_first_frame")
    assert decide(None, DEFAULT) == Verdict("reject", None, "not_an_image")


# --- the sample data ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLE_VERDICTS))
def test_sample_file_verdict(name: str) -> None:
    fmt, action, reason = SAMPLE_VERDICTS[name]
    assert check_bytes(sample(name), DEFAULT) == Verdict(action, fmt, reason)


def test_sample_files_are_small_and_all_listed() -> None:
    files = {p.name for p in SAMPLE.iterdir() if p.name != "README.md"}
    assert files == set(SAMPLE_VERDICTS)
    assert all((SAMPLE / n).stat().st_size < 100_000 for n in files)
    assert sample("card_copy.jpg") == sample("card_jpeg.jpg")


@pytest.mark.parametrize("name", ACCEPTED_SAMPLES)
def test_accepted_images_are_sent_byte_for_byte(name: str) -> None:
    data = sample(name)
    for policy in (DEFAULT, ImagePolicy(max_side=4000)):
        result = prepared(data, policy)
        assert result.data is data
        assert result.verdict.action == "accept"
        assert (result.width, result.height) == decode(data).size


def test_jfif_and_exif_jpegs_are_both_jpeg() -> None:
    assert sample("card_jfif.jpg")[6:10] == b"JFIF"
    assert sample("card_jpeg.jpg")[6:10] == b"Exif"
    assert prepared(sample("card_jfif.jpg")).format == prepared(sample("card_jpeg.jpg")).format


# --- GIF ---------------------------------------------------------------------------------------


def test_animated_gif_sends_its_first_frame_as_png() -> None:
    data = sample("anim.gif")
    result = prepared(data)
    assert result.format == "png" and result.verdict == Verdict("convert", "gif", "gif_first_frame")
    sent = decode(result.data)
    assert sent.format == "PNG" and (sent.width, sent.height) == (result.width, result.height)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 4
        first = gif.convert("RGB")
        gif.seek(2)
        third = gif.convert("RGB")
    assert ImageChops.difference(sent.convert("RGB"), first).getbbox() is None
    assert ImageChops.difference(sent.convert("RGB"), third).getbbox() is not None


def test_gif_transparency_survives_as_png_alpha() -> None:
    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ImageDraw.Draw(im).rectangle((10, 0, 19, 9), fill=1)
    sent = decode(prepared(encode(im, "GIF", transparency=0)).data)
    assert sent.mode == "RGBA"
    assert sent.getpixel((0, 0))[3] == 0 and sent.getpixel((15, 5)) == (255, 0, 0, 255)


def test_gif_is_also_resized() -> None:
    result = prepared(sample("anim.gif"), ImagePolicy(max_side=100))
    assert (result.width, result.height) == (71, 100)
    assert result.verdict.reason == "gif_first_frame" and result.format == "png"
    # Resampled in RGB, not nearest-neighbour in the palette: edges get in-between colours.
    assert len(decode(result.data).getcolors(1 << 16)) > 256


# --- resize ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """A 12-megapixel camera-sized JPEG."""
    return encode(picture((4000, 3000)), "JPEG", quality=90)


@pytest.fixture
def draft_scales(monkeypatch) -> list[tuple[int, int]]:
    """The sizes libjpeg was asked to decode at, recorded for every JPEG draft call."""
    scales: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        scales.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return scales


def test_large_jpeg_is_decoded_at_reduced_scale_then_resized(big_jpeg: bytes,
                                                             draft_scales) -> None:
    result = prepared(big_jpeg, ImagePolicy(max_side=1024))
    assert set(draft_scales) == {(2000, 1500)}  # libjpeg decoded at 1/2: never the full 12 MP
    assert result.verdict == Verdict("convert", "jpeg", "resize")
    assert (result.width, result.height) == (1024, 768)
    sent = decode(result.data)
    assert sent.format == "JPEG" and sent.size == (1024, 768) and sent.mode == "RGB"


def test_large_jpeg_resize_is_close_to_a_full_resolution_reference(big_jpeg: bytes) -> None:
    # The draft decode and the Hamming filter lose no visible quality: compare with the slow way,
    # every pixel decoded and a Lanczos resize, in 0-255 levels averaged over channels.
    sent = decode(prepared(big_jpeg, ImagePolicy(max_side=1024)).data)
    assert max(sent.size) == 1024
    reference = decode(big_jpeg).resize(sent.size, Image.Resampling.LANCZOS)
    assert max(ImageStat.Stat(ImageChops.difference(sent, reference)).mean) < 2


def test_jpeg_is_handed_to_the_decoder_in_one_read(big_jpeg: bytes, monkeypatch) -> None:
    # One read, so one decoder call: the GIL is released once for the whole decode, rather
    # than retaken after each 64 KB block (each a wait while another thread runs Python).
    reads: list[int] = []

    class Spy(io.BytesIO):
        def read(self, size=-1):
            chunk = super().read(size)
            reads.append(len(chunk))
            return chunk

    monkeypatch.setattr(images, "_File", Spy)
    for policy in (DEFAULT, ImagePolicy(max_side=1024)):  # validated as is, and resized
        reads.clear()
        prepared(big_jpeg, policy)
        assert [n for n in reads if n >= 65536] == [len(big_jpeg)]
    # A cut file still asks for more than there is, so it is still truncated, not corrupt.
    cut = big_jpeg[: len(big_jpeg) * 3 // 4]
    assert check_bytes(cut, ImagePolicy(max_side=1024)) == Verdict("reject", "jpeg", "truncated")


def test_accepted_jpeg_is_validated_at_one_eighth_scale(big_jpeg: bytes, draft_scales) -> None:
    assert prepared(big_jpeg).data is big_jpeg
    assert set(draft_scales) == {(500, 375)}
    cut = big_jpeg[: len(big_jpeg) * 3 // 4]
    assert check_bytes(cut, DEFAULT) == Verdict("reject", "jpeg", "truncated")


@pytest.mark.parametrize("size, max_side, expected", [
    ((3000, 1000), 1024, (1024, 341)),
    ((1000, 3000), 600, (200, 600)),
    ((1500, 1500), 1000, (1000, 1000)),
])
def test_resize_keeps_the_aspect_ratio(size, max_side, expected) -> None:
    for fmt in ("PNG", "WEBP", "JPEG"):
        result = prepared(encode(picture(size), fmt), ImagePolicy(max_side=max_side))
        assert (result.width, result.height) == expected
        assert decode(result.data).size == expected
        assert result.verdict.reason == "resize" and result.format == "jpeg"


def test_resize_applies_exif_orientation_first() -> None:
    data = sample("card_exif_rotated.jpg")
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (336, 240)  # stored sideways
        upright = ImageOps.exif_transpose(stored)
    result = prepared(data, ImagePolicy(max_side=168))
    sent = decode(result.data)
    assert (result.width, result.height) == sent.size == (120, 168)
    assert 0x0112 not in sent.getexif()  # no orientation left to apply twice
    expected = upright.resize(sent.size)
    upside_down = expected.rotate(180)
    diff = ImageStat.Stat(ImageChops.difference(sent, expected)).mean
    wrong = ImageStat.Stat(ImageChops.difference(sent, upside_down)).mean
    assert max(diff) < 12 < max(wrong)


def test_resized_png_with_real_transparency_stays_png() -> None:
    result = prepared(sample("card_png.png"), ImagePolicy(max_side=120))
    sent = decode(result.data)
    assert result.format == "png" and sent.mode == "RGBA" and sent.size == (86, 120)
    assert sent.getpixel((0, 0))[3] == 0  # the rounded corner is still transparent


def test_resized_opaque_rgba_becomes_jpeg() -> None:
    data = encode(picture((400, 300)).convert("RGBA"), "PNG")
    result = prepared(data, ImagePolicy(max_side=200))
    assert result.format == "jpeg" and decode(result.data).mode == "RGB"


def test_resized_16_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.linear_gradient("L").resize((400, 300)).point(lambda v: v * 257, "I").convert("I;16")
    sent = decode(prepared(encode(grey, "PNG"), ImagePolicy(max_side=200)).data)
    assert sent.mode == "L"
    low, high = sent.getextrema()
    assert low < 10 and high > 240 and ImageStat.Stat(sent).mean[0] < 200


def test_cmyk_jpeg_is_resized_to_rgb() -> None:
    result = prepared(encode(picture((400, 300)).convert("CMYK"), "JPEG"), ImagePolicy(max_side=100))
    assert decode(result.data).mode == "RGB"


def test_heic_resize_is_sent_as_jpeg() -> None:
    result = prepared(sample("card_heic.heic"), ImagePolicy(max_side=168))
    assert result.format == "jpeg" and (result.width, result.height) == (120, 168)


# --- transcode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, fmt", [
    ("reject_avif.avif", "avif"),
    ("reject_heif.heif", "heif"),
    ("reject_jp2.jp2", "jp2"),
    ("reject_psd.psd", "psd"),
])
def test_transcode_sends_rgb_jpeg(name: str, fmt: str) -> None:
    result = prepared(sample(name), TRANSCODE_ALL)
    assert result.verdict == Verdict("convert", fmt, f"transcode:{fmt}")
    sent = decode(result.data)
    assert result.format == "jpeg" and sent.format == "JPEG" and sent.mode == "RGB"
    assert sent.size == (result.width, result.height) == (240, 336)
    # The card's border colour comes through (this is the card, not a blank canvas).
    assert ImageStat.Stat(sent.crop((0, 0, 4, 336))).stddev[0] < 20


def test_transcode_with_resize() -> None:
    result = prepared(sample("reject_psd.psd"), ImagePolicy(max_side=168, transcode=("psd",)))
    assert (result.width, result.height) == (120, 168) and result.format == "jpeg"


def test_transcode_flattens_alpha_onto_white() -> None:
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((20, 0, 39, 39), fill=(0, 0, 255, 255))
    sent = decode(prepared(encode(im, "AVIF", quality=90), TRANSCODE_ALL).data)
    assert min(sent.getpixel((5, 20))) > 230  # transparent became white, not black
    assert sent.getpixel((30, 20))[2] > 200


def test_psd_sample_decodes_to_the_drawn_card() -> None:
    with Image.open(SAMPLE / "reject_psd.psd") as psd:
        assert psd.format == "PSD" and psd.mode == "RGB" and psd.size == (240, 336)


# --- bad input ---------------------------------------------------------------------------------


def test_empty_input_is_rejected_as_empty() -> None:
    assert check_bytes(b"", DEFAULT) == Verdict("reject", None, "empty")


# Pillow warns about the half-read EXIF of a cut TIFF; the verdict is what matters here.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("name", ["card_png.png", "card_webp.webp", "card_heic.heic",
                                  "card_bmp.bmp", "card_jfif.jpg", "card_tiff.tif"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_images_are_rejected_as_truncated(name: str, keep: float) -> None:
    data = sample(name)
    verdict = check_bytes(data[: int(len(data) * keep)], DEFAULT)
    assert verdict.action == "reject" and verdict.reason == "truncated", verdict


def test_truncated_image_is_rejected_even_when_it_would_be_resized() -> None:
    data = encode(picture((800, 600)), "JPEG")
    assert check_bytes(data[: len(data) // 2], ImagePolicy(max_side=100)).reason == "truncated"


def test_corrupt_header_is_rejected_as_corrupt() -> None:
    data = bytearray(sample("png_named.jpg"))
    data[29] ^= 0xFF  # IHDR's CRC
    assert check_bytes(bytes(data), DEFAULT) == Verdict("reject", "png", "corrupt")
    jpeg = bytearray(sample("card_jfif.jpg"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = b"\x00\x00\x00\x00"  # zero width and height
    assert check_bytes(bytes(jpeg), DEFAULT).reason in ("corrupt", "truncated")
    assert check_bytes(bytes(jpeg), DEFAULT).action == "reject"


def test_pixel_count_is_checked_from_the_header_before_decoding() -> None:
    data = sample("card_jpeg.jpg")  # 240 x 336 = 80640 px
    assert check_bytes(data, ImagePolicy(max_pixels=80_640)).action == "accept"
    assert check_bytes(data, ImagePolicy(max_pixels=80_639)) == Verdict("reject", "jpeg", "too_large")


def test_decompression_bomb_is_too_large_whatever_the_policy_allows() -> None:
    bomb = sample("broken_bomb.png")
    assert len(bomb) < 1000
    for policy in (DEFAULT, ImagePolicy(max_pixels=10**10)):
        assert check_bytes(bomb, policy) == Verdict("reject", "png", "too_large")


def test_bomb_below_pillows_limit_is_caught_by_the_policy() -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 8000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 9001)) + chunk(b"IEND", b""))
    assert check_bytes(png, DEFAULT) == Verdict("reject", "png", "too_large")  # 72 MP > 64 MP


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("data", [
    b"\xff\xd8\xff" + b"\x00" * 50,
    b"\x89PNG\r\n\x1a\n" + b"\xff" * 100,
    b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8,
    ftyp(b"heic", b"mif1") + b"\x00" * 64,
    b"II*\x00" + b"\xff" * 40,
    b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00" + b"\xff" * 40,
    b"GIF89a" + b"\x00" * 3,
])
def test_garbage_after_a_signature_never_raises(data: bytes) -> None:
    verdict = check_bytes(data, DEFAULT)
    assert verdict.action == "reject" and verdict.reason in ("truncated", "corrupt"), verdict


def test_prepare_image_is_safe_to_run_in_threads() -> None:
    names = sorted(SAMPLE_VERDICTS) * 3
    policy = ImagePolicy(max_side=100, transcode=("avif", "heif", "jp2", "psd"))
    serial = [check_bytes(sample(n), policy) for n in names]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda n: check_bytes(sample(n), policy), names))
    assert threaded == serial
