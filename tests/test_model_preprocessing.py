"""The shared preprocessing: decoding any real image, the paper's 256 → 224 geometry, normalisation, errors."""

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from model import (
    CorruptImage,
    ImageTooLarge,
    Preprocessing,
    Preprocessor,
    UnsupportedImage,
    decode_image,
    load_image,
)
from model.preprocessing import crop_offsets


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_real_photos_become_256_squares(photos):
    for path in photos:
        pixels = load_image(path.read_bytes())
        assert pixels.shape == (3, 256, 256) and pixels.dtype == torch.uint8, path.name
        assert pixels.float().std() > 10, path.name  # a photo, not a blank


def test_grayscale_photo_becomes_three_equal_channels(photos):
    airedale = next(p for p in photos if "Airedale" in p.name)
    assert Image.open(airedale).mode == "L"
    pixels = load_image(airedale.read_bytes())
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_shorter_side_to_256_then_the_central_square():
    # 512×256: left quarter black, middle half grey, right quarter white. Only the grey middle survives.
    image = Image.new("RGB", (512, 256), (128, 128, 128))
    image.paste((0, 0, 0), (0, 0, 128, 256))
    image.paste((255, 255, 255), (384, 0, 512, 256))
    pixels = load_image(encode(image, "PNG"))
    assert torch.all(pixels == 128)
    # Portrait: the central square of a 100×300 image; top third red, bottom third blue.
    portrait = Image.new("RGB", (100, 300), (0, 200, 0))
    portrait.paste((255, 0, 0), (0, 0, 100, 100))
    portrait.paste((0, 0, 255), (0, 200, 100, 300))
    pixels = load_image(encode(portrait, "PNG"))
    assert torch.all(pixels[:, 4:-4] == torch.tensor([0, 200, 0]).view(3, 1, 1))  # upscaled green middle


def test_tiny_images_are_upscaled():
    pixels = load_image(encode(Image.new("RGB", (3, 5), (10, 20, 30)), "PNG"))
    assert pixels.shape == (3, 256, 256)
    assert torch.all(pixels == torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1))


def marked_image() -> Image.Image:
    """300×200, red in the top-left 100×100 corner, black elsewhere."""
    image = Image.new("RGB", (300, 200))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    return image


@pytest.mark.parametrize("orientation, corner", [(1, "top-left"), (3, "bottom-right"), (6, "top-right"), (8, "bottom-left")])
def test_exif_orientation_is_applied(orientation, corner):
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = decode_image(encode(marked_image(), "JPEG", exif=exif, quality=95))
    assert image.size == ((300, 200) if orientation in (1, 3) else (200, 300))
    w, h = image.size
    probes = {"top-left": (5, 5), "top-right": (w - 5, 5), "bottom-left": (5, h - 5), "bottom-right": (w - 5, h - 5)}
    for name, xy in probes.items():
        red = image.getpixel(xy)[0] > 200
        assert red == (name == corner), (orientation, name, image.getpixel(xy))


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 25, 50))
    image = decode_image(encode(rgba, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((10, 10)) == (0, 0, 255) and image.getpixel((40, 10)) == (255, 255, 255)
    palette = rgba.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = palette.getpixel((40, 10))
    assert decode_image(encode(palette, "PNG", transparency=palette.getpixel((40, 10)))).getpixel((40, 10)) == (
        255,
        255,
        255,
    )
    la = Image.new("LA", (8, 8), (0, 0))
    assert decode_image(encode(la, "PNG")).getpixel((1, 1)) == (255, 255, 255)
    assert decode_image(encode(rgba, "PNG"), background=(0, 0, 0)).getpixel((40, 10)) == (0, 0, 0)


def test_cmyk_and_sixteen_bit_and_palette_modes():
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = decode_image(encode(cmyk, "JPEG", quality=95)).getpixel((20, 20))
    assert r > 200 and g < 60 and b < 60
    sixteen = Image.new("I;16", (40, 40), 65535 // 2)
    value = decode_image(encode(sixteen, "PNG")).getpixel((20, 20))
    assert value[0] == value[1] == value[2] and 120 <= value[0] <= 135  # scaled, not clipped at 255
    palette = Image.new("RGB", (40, 40), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_image(encode(palette, "GIF")).getpixel((5, 5)) == (0, 128, 0)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert decode_image(data).getpixel((15, 15)) == (255, 0, 0)
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert decode_image(webp).getpixel((15, 15)) == (255, 0, 0)


def lossless_copies(photos) -> dict[str, Image.Image]:
    """Two real photos as plain in-memory images (no EXIF, no file): colour (RGB) and grayscale (L)."""
    colour = decode_image(next(p for p in photos if "goldfish" in p.name).read_bytes())
    with Image.open(next(p for p in photos if "Airedale" in p.name)) as opened:
        assert opened.mode == "L"
        grey = Image.frombytes("L", opened.size, opened.tobytes())
    return {"RGB": colour, "L": grey}


def assert_decodes_as_the_png(image: Image.Image, data: bytes, what: str) -> None:
    """``data`` (the same image in a lossless format) decodes to exactly the PNG's pixels and size, and
    becomes exactly the PNG's 256×256 network input."""
    png = encode(image, "PNG")
    decoded, reference = decode_image(data), decode_image(png)
    assert decoded.mode == reference.mode == "RGB" and decoded.size == reference.size == image.size, what
    assert decoded.tobytes() == reference.tobytes(), what
    assert torch.equal(load_image(data), load_image(png)), what


def test_bmp_and_tiff_are_accepted(photos):
    """A real photo, colour and grayscale, as BMP and as TIFF (uncompressed, LZW, deflate): the pixels and the
    preprocessed input of the same image as PNG, every one."""
    variants = {"BMP": ("BMP", {}), "TIFF": ("TIFF", {}), "TIFF-LZW": ("TIFF", {"compression": "tiff_lzw"})}
    variants["TIFF-deflate"] = ("TIFF", {"compression": "tiff_adobe_deflate"})
    for mode, image in lossless_copies(photos).items():
        for name, (fmt, options) in variants.items():
            data = encode(image, fmt, **options)
            with Image.open(io.BytesIO(data)) as opened:
                assert opened.format == fmt, name  # it is what its name says
            assert_decodes_as_the_png(image, data, f"{name} {mode}")


def test_lossless_webp_is_accepted(photos):
    """A real photo, colour and grayscale, as lossless WebP: the pixels and preprocessed input of the PNG."""
    for mode, image in lossless_copies(photos).items():
        data = encode(image, "WEBP", lossless=True, exact=True)
        assert data[8:12] == b"WEBP" and b"VP8L" in data[:40], mode  # lossless (VP8L), not lossy VP8
        assert_decodes_as_the_png(image, data, f"WebP {mode}")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels, with a tiny (invalid) image body: a pixel bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(ImageTooLarge, match="50,000×50,000|limit") as e:
        decode_image(png_header_only(50_000, 50_000))
    assert "pixels" in str(e.value)
    with pytest.raises(ImageTooLarge):
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=9_999)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", CorruptImage),
        (b"hello, this is text", UnsupportedImage),
        (b"%PDF-1.4\n1 0 obj<<>>endobj", UnsupportedImage),
        (b"<!doctype html><html></html>", UnsupportedImage),
        (b"PK\x03\x04" + b"\x00" * 40, UnsupportedImage),
    ],
)
def test_not_images(data, error):
    with pytest.raises(error):
        load_image(data)


def test_unsupported_but_real_formats_are_refused():
    with pytest.raises(UnsupportedImage, match="supported format"):
        decode_image(encode(Image.new("RGB", (10, 10)), "PPM"))


def test_truncated_images(photos):
    jpeg = photos[0].read_bytes()
    png = encode(Image.effect_noise((300, 300), 50).convert("RGB"), "PNG")
    for data in (jpeg[: len(jpeg) // 2], png[: len(png) // 2], jpeg[:200]):
        with pytest.raises(CorruptImage):
            load_image(data)


def test_ten_crops_are_corners_centre_and_mirrors():
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    pre = Preprocessor(Preprocessing(mean=(0.0, 0.0, 0.0)))
    ten = pre.from_uint8(images, "ten")
    assert ten.shape == (2, 10, 3, 224, 224)
    x = images.float()
    expected = [x[:, :, t : t + 224, l : l + 224] for t, l in ((0, 0), (0, 32), (32, 0), (32, 32), (16, 16))]
    for i, patch in enumerate(expected):
        assert torch.equal(ten[:, i], patch)
        assert torch.equal(ten[:, i + 5], patch.flip(-1))
    assert torch.equal(pre.from_uint8(images, "center"), ten[:, 4])
    assert crop_offsets(227 + 29, 227, "center") == [(14, 14)]
    with pytest.raises(ValueError, match="crops"):
        pre.from_uint8(images, "five")


def test_mean_image_is_subtracted_before_cropping():
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    mean = torch.rand(3, 256, 256) * 255
    out = Preprocessor(Preprocessing(mean="image"), mean).from_uint8(images, "center")
    torch.testing.assert_close(out[0], (images[0].float() - mean)[:, 16:240, 16:240])


def test_caffe_style_normalisation():
    pixel = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 256, 256).contiguous()
    pre = Preprocessor(Preprocessing(crop=227, channel_order="BGR", mean=(104.0, 116.7, 122.7), std=(2.0, 2.0, 2.0)))
    out = pre.from_uint8(pixel)
    assert out.shape == (1, 3, 227, 227)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([(50 - 104.0) / 2, (100 - 116.7) / 2, (200 - 122.7) / 2]))
    unit = Preprocessor(Preprocessing(pixel_scale=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    torch.testing.assert_close(unit.from_uint8(pixel)[0, :, 0, 0], (torch.tensor([200, 100, 50]) / 255 - 0.5) / 0.25)


def test_from_bytes_is_load_then_from_uint8(photos):
    data = photos[3].read_bytes()
    pre = Preprocessor(Preprocessing(mean=(123.68, 116.78, 103.94)))
    torch.testing.assert_close(pre.from_bytes(data), pre.from_uint8(load_image(data).unsqueeze(0)))
    assert pre.from_bytes(data, "ten").shape == (1, 10, 3, 224, 224)
