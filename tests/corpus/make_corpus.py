"""Write the hostile-input corpus: files that are not images, broken images, unusual images and bombs.

    python tests/corpus/make_corpus.py OUT_DIR       # writes OUT_DIR/<name> and OUT_DIR/manifest.json

Everything is made here from nothing (Pillow, zlib, struct and hand-written headers), except the two
arithmetic-coded JPEGs beside this script: Pillow cannot write arithmetic coding, so they were made once
with libjpeg-turbo's ``jpegtran`` (Debian package libjpeg-turbo-progs) from a 48×64 baseline JPEG:

    jpegtran -arithmetic -copy none base.jpg > arithmetic.jpg                  # SOF9 + DAC markers
    jpegtran -arithmetic -progressive -copy none base.jpg > arithmetic-progressive.jpg   # SOF10

``manifest.json`` lists one entry per request to send: how to send it (``multipart``: the file as one
``file`` part; ``raw``: the bytes as the body) with which Content-Type, and what the answer must be:
``expect`` is "ok" (200 with labels), an HTTP status (4xx, a problem+json body), or "any" (either). A few request-shape
entries (many parts, a huge field name) carry a ready-made multipart body and its Content-Type instead.
The names say what each file is; ``why`` says what it tests.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
DEFAULT_MAX_FILES = 16  # the service's default max_files


@dataclass(frozen=True)
class Entry:
    name: str  # file name in OUT_DIR (also the upload's filename)
    expect: str | int  # "ok", the 4xx status, or "any" (either)
    why: str
    send: str = "multipart"  # multipart | raw | body (a complete request body in the file)
    content_type: str = "application/octet-stream"  # of the part (multipart) or of the request (raw, body)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def scene(size=(96, 72)) -> Image.Image:
    """A small picture with no symmetry (so a wrong rotation or flip shows), from nothing."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 4, width // 3, height // 2), fill=(220, 30, 30))
    draw.ellipse((width // 2, height // 3, width - 6, height - 4), fill=(30, 60, 220))
    draw.polygon(
        [(width // 3, height - 2), (width // 2, height // 2), (width // 2 + 8, height - 2)], fill=(20, 200, 40)
    )
    return image


def chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes, level: int = 6) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB/RGBA). ``raw_rows``: filter byte + samples per row."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw_rows, level)) + chunk(b"IEND", b"")


def png_16bit(image: Image.Image, alpha: bool) -> bytes:
    """16 bits per sample, RGB or RGBA: each 8-bit value v stored as v·257 (big-endian)."""
    source = image.convert("RGBA" if alpha else "RGB")
    channels = 4 if alpha else 3
    pixels = source.tobytes()
    rows = bytearray()
    for y in range(source.height):
        rows.append(0)
        for value in pixels[y * source.width * channels : (y + 1) * source.width * channels]:
            rows += struct.pack(">H", value * 257)
    return png(source.width, source.height, 16, 6 if alpha else 2, bytes(rows))


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG declaring width × height RGB pixels, with almost no data."""
    return png(width, height, 8, 2, b"\0" * 64)


def png_real_bomb(side: int) -> bytes:
    """A real decompression bomb: side × side grayscale zeros, deflated (≈ 1000:1)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_text_bomb(image: Image.Image) -> bytes:
    """A small PNG with a zTXt chunk that inflates to 64 MB (Pillow caps text chunks)."""
    good = encode(image, "PNG")
    ztxt = b"Comment\0\0" + zlib.compress(b"A" * 64_000_000, 9)
    at = good.index(b"IDAT") - 4
    return good[:at] + chunk(b"zTXt", ztxt) + good[at:]


def gif_bomb(width: int = 65535, height: int = 65535) -> bytes:
    """A GIF whose logical screen and only frame are width × height, with a few bytes of LZW data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    lzw = b"\x02" + b"\x02\x4c\x01" + b"\x00"  # code size 2, one sub-block: clear, 0, end
    return screen + frame + lzw + b"\x3b"


def gif_javascript_polyglot() -> bytes:
    """Both a GIF and a JavaScript file: the screen width bytes are '/*', a comment block closes it."""
    width = struct.unpack("<H", b"/*")[0]  # 10799 px wide, 4 high: a valid image
    screen = b"GIF89a" + struct.pack("<HHBBB", width, 4, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    comment = b"\x21\xfe" + bytes([14]) + b"*/=alert(1);//" + b"\x00"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x4c\x01\x00"
    return screen + comment + frame + b"\x3b"


def png_corrupt_deflate(good: bytes) -> bytes:
    """The PNG with bytes of its compressed data flipped (its CRC recomputed, so only inflating fails)."""
    at = good.index(b"IDAT")
    (length,) = struct.unpack(">I", good[at - 4 : at])
    data = bytearray(good[at + 4 : at + 4 + length])
    for i in range(10, min(60, length - 4)):
        data[i] ^= 0x5A
    return good[: at - 4] + chunk(b"IDAT", bytes(data)) + good[at + 8 + length :]


def webp_constant(width: int, height: int) -> bytes:
    """A real lossless WebP of width × height pixels of one colour, in 38 bytes: a 16×16 one with its
    VP8L header's size fields rewritten (a single-colour image codes to no bits per pixel at any size)."""
    data = encode(Image.new("RGB", (16, 16), (10, 20, 30)), "WEBP", lossless=True, quality=0, method=0)
    at = data.index(b"VP8L") + 8 + 1  # chunk header, then the 0x2f signature byte
    (bits,) = struct.unpack("<I", data[at : at + 4])
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    return data[:at] + struct.pack("<I", bits) + data[at + 4 :]


def webp_bomb() -> bytes:
    """A lossless WebP declaring 16384 × 16384 pixels (the format's maximum), with no real data."""
    bits = (16384 - 1) | ((16384 - 1) << 14)  # 14-bit width-1, 14-bit height-1, alpha 0, version 0
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\0" * 16
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_canvas_bomb() -> bytes:
    """An extended WebP (VP8X) whose canvas is 2²⁴ × 2²⁴ pixels around a 1×1 frame."""
    small = encode(Image.new("RGB", (1, 1), (9, 9, 9)), "WEBP", lossless=True)
    frame = small[12:]  # the VP8L chunk
    side = (1 << 24) - 1
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + side.to_bytes(3, "little") + side.to_bytes(3, "little")
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset, length) of each segment before the scan."""
    out, i = [], 2
    while i < len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        out.append((marker, i, length))
        if marker == 0xDA:
            break
        i += 2 + length
    return out


def jpeg_with_bad_huffman_table(baseline: bytes) -> bytes:
    """The first DHT's code-length counts say 3 codes of length 1 (only 2 exist): libjpeg's 'Bogus
    Huffman table definition'. The counts still sum to the same number, so the segment stays well formed."""
    _, offset, _ = next(s for s in jpeg_segments(baseline) if s[0] == 0xC4)
    counts_at = offset + 5  # FF C4, length (2), class/id (1)
    counts = list(baseline[counts_at : counts_at + 16])
    total = sum(counts)
    bad = [3] + [0] * 15
    bad[8] = total - 3  # keep the sum (the number of symbol bytes that follow)
    return baseline[:counts_at] + bytes(bad) + baseline[counts_at + 16 :]


def jpeg_with_garbage_scan(baseline: bytes) -> bytes:
    """Random bytes in the middle of the entropy-coded data (markers left alone): libjpeg warns and
    decodes something."""
    data = bytearray(baseline)
    _, scan, length = jpeg_segments(baseline)[-1]
    start = scan + 2 + length + 20
    for i in range(start, min(start + 200, len(data) - 2)):
        data[i] = (i * 73) % 255 if data[i] != 0xFF else 0xFF
    return bytes(data)


def jpeg_header_bomb(baseline: bytes, width: int = 65500, height: int = 65500) -> bytes:
    """The baseline JPEG with its frame header (SOF0) claiming width × height."""
    _, offset, _ = next(s for s in jpeg_segments(baseline) if s[0] == 0xC0)
    at = offset + 5  # FF C0, length (2), precision (1), then height, width
    return baseline[:at] + struct.pack(">HH", height, width) + baseline[at + 4 :]


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_scan_bomb(side: int, scans: int) -> bytes:
    """A progressive grayscale JPEG whose one AC scan (a few runs of empty blocks: ~10 bytes) is repeated
    ``scans`` times. Each repetition is another pass over every block of a side × side image: the bytes
    are few, the decoding time is not (libjpeg only warns about the repeated scans)."""
    blocks = (side // 8) ** 2
    assert blocks >= 2**14, "the AC scan codes runs of at least 2¹⁴ blocks: side ≥ 1024"
    quant = jpeg_segment(0xDB, b"\x00" + bytes([1] * 64))
    frame = jpeg_segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")  # SOF2, 1 component
    dc_table = jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # one code: DC difference 0
    ac_table = jpeg_segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0")  # one code: EOB run of 2¹⁴+
    dc_scan = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + b"\x00" * ((blocks + 7) // 8)
    bits = ""
    remaining = blocks
    while remaining >= 2**14:  # runs of 2¹⁴…2¹⁵-1 empty blocks: code '0' and 14 extra bits
        run = min(remaining, 2**15 - 1)
        bits += "0" + format(run - 2**14, "014b")
        remaining -= run
    bits += "1" * (-len(bits) % 8)
    ac_data = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    ac_scan = jpeg_segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + ac_data  # spectral band 1…63
    return b"\xff\xd8" + quant + frame + dc_table + ac_table + dc_scan + ac_scan * scans + b"\xff\xd9"


def ycck_jpeg(image: Image.Image) -> bytes:
    """A 4-component JPEG whose Adobe APP14 marker says YCCK (transform 2). Pillow writes CMYK (transform 0)
    and cannot write YCCK: the same samples relabelled, which decoders convert YCCK → CMYK → RGB."""
    data = encode(image.convert("CMYK"), "JPEG", quality=90)
    _, offset, length = next(s for s in jpeg_segments(data) if s[0] == 0xEE)
    assert data[offset + 4 : offset + 9] == b"Adobe"
    transform_at = offset + 2 + length - 1  # the last byte of the segment
    assert data[transform_at] == 0
    return data[:transform_at] + b"\x02" + data[transform_at + 1 :]


def exif_oriented(upright: Image.Image, orientation: int) -> bytes:
    """A JPEG whose pixels are stored so that applying EXIF ``orientation`` shows ``upright``."""
    inverse = {
        1: [],
        2: [Image.Transpose.FLIP_LEFT_RIGHT],
        3: [Image.Transpose.ROTATE_180],
        4: [Image.Transpose.FLIP_TOP_BOTTOM],
        5: [Image.Transpose.TRANSPOSE],
        6: [Image.Transpose.ROTATE_90],
        7: [Image.Transpose.TRANSVERSE],
        8: [Image.Transpose.ROTATE_270],
    }[orientation]
    stored = upright
    for step in inverse:
        stored = stored.transpose(step)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif)


def tiff_cyclic_ifd(image: Image.Image) -> bytes:
    """A TIFF whose next-IFD pointer points back at its own IFD: an endless page list."""
    data = bytearray(encode(image.convert("L"), "TIFF"))
    assert data[:4] == b"II*\0"
    (ifd,) = struct.unpack("<I", data[4:8])
    (entries,) = struct.unpack("<H", data[ifd : ifd + 2])
    next_at = ifd + 2 + 12 * entries
    data[next_at : next_at + 4] = struct.pack("<I", ifd)
    return bytes(data)


def tiff_header_bomb() -> bytes:
    """An uncompressed TIFF declaring 100000 × 100000 grayscale pixels, with one strip of 8 bytes."""
    entries = [
        (256, 4, 1, 100_000),  # ImageWidth, LONG
        (257, 4, 1, 100_000),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, 1, 8 + 2 + 12 * 8 + 4),  # StripOffsets: right after the IFD
        (278, 4, 1, 100_000),  # RowsPerStrip
        (279, 4, 1, 8),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + (
            struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        )
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\0" * 8


def bmp_header_bomb() -> bytes:
    """A BMP declaring 100000 × 100000 24-bit pixels, with a few bytes of pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\0" * 16
    header = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return header + info + pixels


def minimal_pdf() -> bytes:
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def zip_archive(inner: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("photo.jpg", inner)
        archive.writestr("readme.txt", "an archive, not an image\n")
    return buffer.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes, str]], boundary: str = "corpus-boundary") -> bytes:
    """A multipart/form-data body from (field name, filename, data, part Content-Type)."""
    out = bytearray()
    for name, filename, data, content_type in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def build() -> list[tuple[Entry, bytes]]:
    picture = scene()
    baseline = encode(picture, "JPEG", quality=90)
    png_picture = encode(picture, "PNG")
    frames = [picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT), picture.convert("L").convert("RGB")]
    palette = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0  # palette entry 0 fully transparent (a tRNS chunk)
    palette_alpha = picture.convert("RGBA").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_alpha.info["transparency"] = bytes(range(0, 256, 16))  # a graded alpha per entry
    items: list[tuple[Entry, bytes]] = []

    def add(name, data, expect, why, **kw):
        items.append((Entry(name, expect, why, **kw), data))

    # Not images at all.
    add("empty.jpg", b"", 422, "zero bytes")
    add("text.txt", b"Just some text, not an image.\n" * 20, 415, "plain text")
    add("page.html", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", 415, "HTML")
    add("document.pdf", minimal_pdf(), 415, "a PDF (Pillow could rasterise one only through Ghostscript)")
    add("archive.zip", zip_archive(baseline), 415, "a ZIP holding a JPEG")
    add(
        "drawing.eps",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        415,
        "PostScript: must never reach Ghostscript",
    )
    add("vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 415, "SVG")
    add("icon.ico", encode(picture, "ICO"), 415, "a format Pillow reads but the service does not accept")
    add("image.jp2", encode(picture, "JPEG2000"), 415, "JPEG 2000: not an accepted format")
    add("photoshop.psd", b"8BPS\0\x01" + b"\0" * 6 + struct.pack(">HIIHH", 3, 64, 64, 8, 3), 415, "a PSD header")

    # Broken images.
    add("truncated-header.jpg", baseline[:30], 422, "a JPEG cut inside its header")
    add("truncated.jpg", baseline[: len(baseline) // 2], 422, "a JPEG cut in the middle of its scan")
    add("truncated.png", png_picture[: len(png_picture) // 2], 422, "a PNG cut in the middle of its data")
    add("truncated-header.png", png_picture[:20], 422, "a PNG cut inside IHDR")
    add("bad-huffman.jpg", jpeg_with_bad_huffman_table(baseline), 422, "a JPEG whose Huffman table is impossible")
    add(
        "garbage-scan.jpg",
        jpeg_with_garbage_scan(baseline),
        "any",
        "damaged entropy-coded data: refused (422), or decoded with libjpeg's warnings (200)",
    )
    add("corrupt-deflate.png", png_corrupt_deflate(png_picture), 422, "a PNG whose compressed data is damaged")
    add("gif-js-polyglot.gif", gif_javascript_polyglot(), "ok", "a valid GIF that is also JavaScript")

    # Unusual but valid images: each must be classified.
    add("progressive.jpg", encode(picture, "JPEG", quality=90, progressive=True), "ok", "progressive JPEG")
    add("arithmetic.jpg", (HERE / "arithmetic.jpg").read_bytes(), "ok", "arithmetic-coded JPEG (SOF9)")
    add(
        "arithmetic-progressive.jpg",
        (HERE / "arithmetic-progressive.jpg").read_bytes(),
        "ok",
        "progressive arithmetic-coded JPEG (SOF10)",
    )
    add("cmyk.jpg", encode(picture.convert("CMYK"), "JPEG", quality=90), "ok", "CMYK JPEG (Adobe transform 0)")
    add("ycck.jpg", ycck_jpeg(picture), "ok", "YCCK JPEG (Adobe transform 2)")
    add("grayscale.jpg", encode(picture.convert("L"), "JPEG"), "ok", "one-channel JPEG")
    add(
        "16bit-gray.png",
        encode(picture.convert("I").point(lambda v: v * 257).convert("I;16"), "PNG"),
        "ok",
        "16-bit grayscale PNG",
    )
    add("16bit-rgb.png", png_16bit(picture, alpha=False), "ok", "16-bit RGB PNG")
    add("16bit-rgba.png", png_16bit(picture, alpha=True), "ok", "16-bit RGBA PNG")
    add("palette-transparent.png", encode(palette, "PNG"), "ok", "palette PNG, one transparent entry (tRNS)")
    add("palette-alpha.png", encode(palette_alpha, "PNG"), "ok", "palette PNG with a graded alpha per entry")
    add("rgba.png", encode(picture.convert("RGBA"), "PNG"), "ok", "RGBA PNG")
    add("gray-alpha.png", encode(picture.convert("LA"), "PNG"), "ok", "grayscale + alpha PNG")
    add("bilevel.png", encode(picture.convert("1"), "PNG"), "ok", "1-bit PNG")
    add("1x1.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok", "one pixel")
    add("1x20000.png", encode(picture.resize((1, 20000)), "PNG"), "ok", "1 wide, 20000 high")
    add("20000x1.png", encode(picture.resize((20000, 1)), "PNG"), "ok", "20000 wide, 1 high")
    add(
        "animated.gif",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0),
        "ok",
        "animated GIF (first frame)",
    )
    add(
        "animated.webp",
        encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=80),
        "ok",
        "animated WebP (first frame)",
    )
    add("lossless.webp", encode(picture, "WEBP", lossless=True), "ok", "lossless WebP")
    add(
        "multipage.tiff",
        encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "ok",
        "three-page TIFF (first page)",
    )
    add("cyclic-ifd.tiff", tiff_cyclic_ifd(picture), "ok", "TIFF whose page list loops back on itself")
    add("float.tiff", encode(picture.convert("F"), "TIFF"), "ok", "32-bit float grayscale TIFF")
    add("image.bmp", encode(picture, "BMP"), "ok", "BMP")
    for orientation in range(1, 9):
        add(f"exif-{orientation}.jpg", exif_oriented(picture, orientation), "ok", f"EXIF orientation {orientation}")
    add("jpeg-zip-polyglot.jpg", baseline + zip_archive(b"payload"), "ok", "a JPEG that is also a ZIP")

    # Bombs: a small file declaring a huge image. Refused from the header, before any pixel is decoded.
    add("bomb.png", png_header_bomb(100_000, 100_000), 413, "PNG header: 10¹⁰ pixels")
    add(
        "real-bomb.png",
        png_real_bomb(8500),
        413,
        "real PNG: 72 MP of zeros deflated to 70 kB (over our 64 MP limit, under Pillow's own 89 MP warning)",
    )
    add("real-bomb.webp", webp_constant(9000, 9000), 413, "real lossless WebP: 81 MP in 38 bytes")
    add(
        "largest-allowed.webp",
        webp_constant(8000, 8000),
        413,
        "64 MP in 38 bytes: exactly the default pixel limit, but decoding it takes ~1.1 GiB, more than the whole "
        "default decode budget (ALEXNET_DECODE_MEMORY_BYTES): refused from its header, before decoding",
    )
    add(
        "large-decoded.webp",
        webp_constant(4000, 4000),
        "ok",
        "16 MP in 38 bytes: ~290 MiB to decode, inside the decode budget: decoded (waiting for room if need be)",
    )
    add("bomb.gif", gif_bomb(), 413, "GIF: a 65535² screen and frame")
    add("bomb.webp", webp_bomb(), 413, "lossless WebP: 16384² pixels, no data")
    add("canvas-bomb.webp", webp_canvas_bomb(), 413, "extended WebP: a 2²⁴ × 2²⁴ canvas")
    add("bomb.jpg", jpeg_header_bomb(baseline), 413, "JPEG frame header: 65500²")
    add(
        "scan-bomb.jpg",
        jpeg_scan_bomb(2048, 20_000),
        422,
        "progressive JPEG: 20000 scans in 330 kB, ~10 s of decoding without a scan limit",
    )
    add("few-scans.jpg", jpeg_scan_bomb(2048, 200), "ok", "the same with 200 scans: under the limit, decoded")
    add("bomb.tiff", tiff_header_bomb(), 413, "TIFF: 100000² pixels")
    add("bomb.bmp", bmp_header_bomb(), 413, "BMP: 100000² pixels")
    add("text-bomb.png", png_text_bomb(picture), 422, "a zTXt chunk inflating to 64 MB: Pillow stops at 1 MB")

    # Request shapes: the Content-Type does not match the bytes, or the form is hostile.
    form = "multipart/form-data; boundary=corpus-boundary"
    add(
        "png-sent-as-jpeg",
        png_picture,
        "ok",
        "raw PNG labelled image/jpeg: the bytes decide",
        send="raw",
        content_type="image/jpeg",
    )
    add(
        "jpeg-sent-as-octet-stream",
        baseline,
        "ok",
        "raw body, application/octet-stream",
        send="raw",
        content_type="application/octet-stream",
    )
    add("jpeg-sent-as-text", baseline, 415, "raw JPEG labelled text/plain", send="raw", content_type="text/plain")
    add(
        "jpeg-sent-as-json",
        baseline,
        415,
        "raw JPEG labelled application/json",
        send="raw",
        content_type="application/json",
    )
    add("text-sent-as-png", b"not a PNG at all", 415, "text labelled image/png", send="raw", content_type="image/png")
    add("part-labelled-pdf.jpg", baseline, "ok", "a JPEG part labelled application/pdf", content_type="application/pdf")
    add(
        "multipart-mixed",
        multipart([("file", "a.jpg", baseline, "image/jpeg")]),
        415,
        "multipart/mixed instead of form-data",
        send="body",
        content_type=form.replace("form-data", "mixed"),
    )
    add(
        "huge-field-name",
        multipart([("f" * 1_000_000, "a.jpg", baseline, "image/jpeg")]),
        400,
        "a part whose field name is 1 MB long: over the parser's 4 kB header limit",
        send="body",
        content_type=form,
    )
    add(
        "long-field-name",
        multipart([("f" * 3000, "a.jpg", baseline, "image/jpeg")]),
        422,
        "a 3000-character field name (under the header limit): not 'file'",
        send="body",
        content_type=form,
    )
    add(
        "huge-filename",
        multipart([("file", "n" * 500_000 + ".jpg", baseline, "image/jpeg")]),
        400,
        "a file part whose filename is 500 kB long",
        send="body",
        content_type=form,
    )
    add(
        "long-filename",
        multipart([("file", "n" * 3000 + ".jpg", baseline, "image/jpeg")]),
        "ok",
        "a 3000-character filename (answered cut to 255)",
        send="body",
        content_type=form,
    )
    add(
        "many-part-headers",
        multipart([("file", "a.jpg", baseline, "image/jpeg\r\n" + "X-Pad: 1\r\n" * 20_000)]),
        400,
        "a file part with 20000 headers: over the parser's limit of 8",
        send="body",
        content_type=form,
    )
    hundred = [("file", f"{i}.png", png_picture, "image/png") for i in range(100)]
    add(
        "100-file-parts",
        multipart(hundred),
        413,
        f"100 file parts (limit {DEFAULT_MAX_FILES})",
        send="body",
        content_type=form,
    )
    return items


def write(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for entry, data in build():
        (out / entry.name).write_bytes(data)
        manifest.append(asdict(entry))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    entries = write(Path(sys.argv[1]))
    print(f"wrote {len(entries)} corpus entries to {sys.argv[1]}")
