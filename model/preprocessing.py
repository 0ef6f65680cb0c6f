"""The one preprocessing path, shared by serving, evaluation and dataset preparation.

    bytes ──decode_image──▶ RGB image ──to_square_uint8──▶ uint8 [3, 256, 256]      (load_image: both steps)
    uint8 [N, 3, 256, 256] ──Preprocessor.from_uint8──▶ normalised centre crop or the paper's 10 crops

The paper (§2): the shorter side rescaled to 256, the central 256×256 patch cropped, the mean image
subtracted. ``prepare`` stores the uint8 256×256 images and evaluation calls ``from_uint8`` on them; the
service calls ``from_bytes``, which ends in ``from_uint8`` too, so train and serve cannot drift apart."""

from __future__ import annotations

import bisect
import io
import itertools
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from PIL import Image, ImageOps

# Pillow plugins we decode: real image formats only (no EPS/PSD/ICNS/…, a smaller attack surface).
# (Phones' multi-picture JPEGs open through the JPEG plugin, as format "MPO".)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 64_000_000  # width × height before decoding; a 48-MP phone photo passes
# Each scan of a progressive JPEG is a pass over the whole image: a few bytes per scan can cost milliseconds
# (a "scan bomb": 670 kB of repeated scans took 35 s to decode). Encoders write ~10 scans, a few dozen at most.
MAX_JPEG_SCANS = 256
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

Crops = Literal["center", "ten"]

# An encoded image: one bytes object, or the pieces it arrived in (a request body's chunks, never joined:
# joining holds the image twice and needs one contiguous block of its size).
ImageBytes = Union[bytes, Sequence[bytes]]


class ImageError(ValueError):
    """Input that is not an image we can classify; the subclasses say which kind. What a service answers
    for each kind is the service's business (service/problems.py maps these classes to HTTP statuses)."""


class UnsupportedImage(ImageError):
    """Not one of ALLOWED_FORMATS."""


class CorruptImage(ImageError):
    """Empty, truncated or undecodable data."""


class ImageTooLarge(ImageError):
    """More pixels than allowed (or, in a service, more decoding memory than it allows)."""


@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect. Stored in every checkpoint; defaults are the paper's."""

    resize: int = 256  # shorter side scaled to this, then the central resize×resize square
    crop: int = 224  # network input (Caffe-trained weights: 227)
    resample: str = "bilinear"  # Pillow filter (antialiased when shrinking)
    channel_order: str = "RGB"  # or "BGR" (Caffe)
    pixel_scale: float = 255.0  # pixel values span [0, pixel_scale] before the mean is subtracted
    mean: str | tuple[float, float, float] = "image"  # "image": the checkpoint's mean_image; or per channel
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per channel, in channel_order
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited onto this RGB

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"crop ({self.crop}) must be positive and at most resize ({self.resize})")
        if self.mean != "image" and len(self.mean) != 3:
            raise ValueError(f"mean must be 'image' or three numbers, got {self.mean!r}")

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "resample": self.resample,
            "channel_order": self.channel_order,
            "pixel_scale": self.pixel_scale,
            "mean": self.mean if self.mean == "image" else list(self.mean),
            "std": list(self.std),
            "background": list(self.background),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        mean = d["mean"]
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            resample=str(d.get("resample", "bilinear")),
            channel_order=str(d["channel_order"]),
            pixel_scale=float(d["pixel_scale"]),
            mean="image" if mean == "image" else tuple(float(v) for v in mean),
            std=tuple(float(v) for v in d["std"]),
            background=tuple(int(v) for v in d.get("background", (255, 255, 255))),
        )


# Per-channel ImageNet mean in 0–255 RGB: what an untrained net or a net without a mean image subtracts.
IMAGENET_RGB_MEAN = (123.68, 116.78, 103.94)


def open_image(data: ImageBytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image's header, read and checked; no pixel decoded yet. Raises what ``decode_image`` raises for
    an unsupported format, too many pixels, a scan bomb or a broken header."""
    pieces = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else tuple(data)
    if not any(pieces):
        raise CorruptImage("empty file: no image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(_reader(pieces), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError:
        raise UnsupportedImage(
            f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(str(e)) from None
    except Exception as e:  # a header so broken that the plugin fails while identifying it
        raise CorruptImage(f"cannot read image header: {e}") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage(f"image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}×{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
    # Start-of-scan markers: 0xFF 0xDA never occurs in entropy-coded data (0xFF is stuffed there), so the
    # count is exact but for bytes in metadata segments (an EXIF thumbnail adds its own scan).
    if image.format in ("JPEG", "MPO") and (scans := _count(pieces, b"\xff\xda")) > MAX_JPEG_SCANS:
        raise CorruptImage(f"a JPEG with {scans:,} scans (encoders write a few dozen at most; limit {MAX_JPEG_SCANS})")
    return image


def _reader(pieces: tuple[bytes, ...]) -> io.IOBase:
    if len(pieces) == 1:
        return io.BytesIO(pieces[0])  # shares a bytes object's buffer: no copy
    return io.BufferedReader(_PiecesReader(pieces), buffer_size=64 * 1024)


class _PiecesReader(io.RawIOBase):
    """A seekable read-only file over bytes in pieces, copying only what is read."""

    def __init__(self, pieces: tuple[bytes, ...]):
        self._pieces = pieces
        self._starts = list(itertools.accumulate((len(p) for p in pieces), initial=0))
        self._size = self._starts[-1]
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        index = bisect.bisect_right(self._starts, self._position) - 1
        while done < len(out) and self._position < self._size:
            piece = self._pieces[index]
            offset = self._position - self._starts[index]
            n = min(len(piece) - offset, len(out) - done)
            out[done : done + n] = piece[offset : offset + n]
            done += n
            self._position += n
            index += 1
        return done


def _count(pieces: tuple[bytes, ...], marker: bytes) -> int:
    """Occurrences of a two-byte ``marker`` in the pieces joined (without joining them)."""
    total = sum(p.count(marker) for p in pieces)
    tail = b""
    for piece in pieces:
        if piece:
            total += (tail + piece[:1]) == marker
            tail = piece[-1:]
    return total


def decode_image(
    data: ImageBytes | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    draft_shorter_side: int | None = None,
) -> Image.Image:
    """Bytes → an 8-bit RGB image, upright (EXIF orientation applied), transparency composited.

    Raises UnsupportedImage (not one of ALLOWED_FORMATS), ImageTooLarge (more than ``max_pixels`` pixels,
    checked from the header before any pixel is decoded) or CorruptImage (truncated or undecodable).
    ``draft_shorter_side`` lets the JPEG decoder shrink by 2/4/8 while keeping the shorter side at
    least that long: a 12-MP photo decodes several times faster and no detail at 256 px is lost.
    ``data`` may also be what ``open_image`` returned (its header read and checked once, not again).
    """
    image = data if isinstance(data, Image.Image) else open_image(data, max_pixels=max_pixels)
    width, height = image.size
    try:
        if draft_shorter_side and image.format in ("JPEG", "MPO"):
            scale = draft_shorter_side / min(width, height)
            image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()  # decodes the first frame of animations
        image = _upright(image)
        return _to_rgb(image, background)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        raise CorruptImage(f"cannot decode {image.format} image: {e}") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag. A broken EXIF block is ignored: the pixels are still good."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_8bit(image)
        mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    elif mode == "L" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale → 8-bit. Pillow's own convert clips at 255 instead of scaling.

    Integer images with values above 255 are taken as 16-bit (0–65535); float images with values at
    most 1 as 0–1. Anything else is clipped to 0–255.
    """
    image = image.convert("F")
    low, high = image.getextrema()
    scale = 255.0 / 65535.0 if high > 255 else (255.0 if high <= 1.0 and low >= 0.0 else 1.0)
    return image.point(lambda v: v * scale).convert("L")


def to_square_uint8(image: Image.Image, size: int = 256, resample: str = "bilinear") -> torch.Tensor:
    """Shorter side to ``size`` (up or down), central size×size patch → uint8 tensor [3, size, size].

    Done as one resize of the central square of the source: the same as scaling then cropping, with
    less work.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    square = image.resize((size, size), RESAMPLE[resample], box=(left, top, left + side, top + side))
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1).contiguous()


# Bytes per pixel of Pillow's storage for each mode: 3-channel modes are stored 4 bytes a pixel.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decode_peak_bytes(image: Image.Image, *, draft_shorter_side: int | None = None) -> int:
    """Most memory ``decode_image`` + ``to_square_uint8`` can hold at once for this opened image: an upper
    bound from its header (mode, size, format), so a service can budget decodes before they start.

    Counted (in Pillow's storage, 4 bytes a pixel for RGB): the decoded image; EXIF rotation's copy if the
    header asks for one (and for a PNG whose EXIF may come after its pixels); each
    conversion on the way to RGB while its source is alive (the worst are RGB/LA with transparency →
    RGBA → composited RGB + alpha: 13 bytes a pixel, and 16-bit grayscale → float → scaled → L: 10); a
    progressive JPEG's whole-image coefficient buffer (6 bytes a pixel at full size, whatever the draft);
    TIFF's strip buffer (up to one more copy) and WebP's two RGBA canvases; 5 % and 4 MiB for the allocator
    and the decoder's own state. The
    bound is checked against measured peaks in tests/test_service_memory.py."""
    width, height = image.size
    full = width * height
    decoded = full
    if draft_shorter_side and image.format in ("JPEG", "MPO"):
        # what draft() will choose: the largest power-of-two reduction keeping the shorter side ≥ requested
        reduction = 1
        while reduction < 8 and min(width, height) / (reduction * 2) >= draft_shorter_side:
            reduction *= 2
        decoded = math.ceil(width / reduction) * math.ceil(height / reduction)
    stored = _STORED_BYTES.get(image.mode, 4)
    transparent = "transparency" in image.info or image.mode in ("LA", "La", "PA", "RGBa", "RGBA")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        conversion = 4 + 4 + 1 + 4  # → F, scaled F (source alive), → L, → RGB
    elif transparent:
        conversion = 4 + 4 + 1  # → RGBA, the RGB canvas, its alpha channel
    else:
        conversion = 0 if image.mode == "RGB" else 4  # → RGB
    per_pixel = stored * (2 if _may_rotate(image) else 1) + conversion
    peak = decoded * per_pixel
    if image.format in ("JPEG", "MPO") and (image.info.get("progressive") or image.info.get("progression")):
        peak += full * 6  # libjpeg buffers every coefficient of a progressive image (16 bits, 3 components)
    if image.format == "TIFF":
        peak += decoded * 4  # libtiff's strip (or tile) buffer: up to the whole image
    elif image.format == "WEBP":
        peak += decoded * 14  # libwebp's RGBA canvases (this frame and the last), copied into the image
    return int(peak * 1.05) + 4 * 1024 * 1024  # allocator rounding, the decoder's own state


def _may_rotate(image: Image.Image) -> bool:
    """Whether decode_image's EXIF rotation may copy the image, from the header alone. A PNG may keep its
    EXIF (eXIf) after the pixels, and Pillow's getexif() would decode the whole image to find it: unknown
    there, so counted."""
    if image.format == "PNG" and "exif" not in image.info:
        return True
    try:
        return image.getexif().get(0x0112) not in (None, 1)
    except Exception:
        return False  # a broken EXIF block: _upright ignores it too


def load_image(
    data: ImageBytes | Image.Image,
    *,
    size: int = 256,
    resample: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> torch.Tensor:
    """Image bytes (or an ``open_image`` result) → the paper's stored form: uint8 [3, size, size], RGB."""
    image = decode_image(data, max_pixels=max_pixels, background=background, draft_shorter_side=size)
    return to_square_uint8(image, size, resample)


def crop_offsets(size: int, crop: int, crops: Crops) -> list[tuple[int, int]]:
    """(top, left) of the centre crop, or of the paper's 4 corners + centre."""
    centre = ((size - crop) // 2, (size - crop) // 2)
    if crops == "center":
        return [centre]
    if crops == "ten":
        far = size - crop
        return [(0, 0), (0, far), (far, 0), (far, far), centre]
    raise ValueError(f"crops must be 'center' or 'ten', got {crops!r}")


class Preprocessor:
    """A checkpoint's preprocessing, ready to run on uint8 batches (on any device) or on image bytes."""

    def __init__(self, preprocessing: Preprocessing, mean_image: torch.Tensor | None = None):
        if preprocessing.mean == "image":
            expected = (3, preprocessing.resize, preprocessing.resize)
            if mean_image is None:
                raise ValueError("preprocessing subtracts a mean image, but none was given")
            if tuple(mean_image.shape) != expected:
                raise ValueError(f"mean image has shape {list(mean_image.shape)}, expected {list(expected)}")
            mean = mean_image.float()
        else:
            mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
        self.config = preprocessing
        self._mean = mean
        self._std = torch.tensor(preprocessing.std, dtype=torch.float32).view(3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._mean.to(device), self._std.to(device))
        return self._on_device[device]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [N, 3, S, S] → float [N, 3, S, S]: scale, channel order, minus mean, over std."""
        mean, std = self._constants(images.device)
        c = self.config
        x = images.float()
        if c.pixel_scale != 255.0:
            x = x.mul_(c.pixel_scale / 255.0)
        if c.channel_order == "BGR":
            x = x.flip(1)
        x = x.sub_(mean)
        if c.std != (1.0, 1.0, 1.0):
            x = x.div_(std)
        return x

    def from_uint8(self, images: torch.Tensor, crops: Crops = "center") -> torch.Tensor:
        """uint8 RGB [N, 3, S, S] → network input: [N, 3, crop, crop], or [N, 10, 3, crop, crop] for
        ``crops="ten"`` (4 corners + centre, then the same five mirrored)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"expected uint8 images [N, 3, S, S], got shape {list(images.shape)}")
        x = self.normalize(images)
        size, crop = x.shape[-1], self.config.crop
        patches = [x[:, :, top : top + crop, left : left + crop] for top, left in crop_offsets(size, crop, crops)]
        if crops == "center":
            return patches[0].contiguous()
        patches += [p.flip(-1) for p in patches]
        return torch.stack(patches, dim=1)

    def decode_peak_bytes(self, image: Image.Image) -> int:
        """Most memory ``load(image)`` can take for an ``open_image`` result (see ``decode_peak_bytes``)."""
        return decode_peak_bytes(image, draft_shorter_side=self.config.resize)

    def load(self, data: ImageBytes | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Image bytes, or an ``open_image`` result → uint8 [3, resize, resize] with this checkpoint's
        resize, filter and background."""
        c = self.config
        return load_image(data, size=c.resize, resample=c.resample, max_pixels=max_pixels, background=c.background)

    def from_bytes(self, data: bytes, crops: Crops = "center", *, max_pixels: int = DEFAULT_MAX_PIXELS):
        """Image bytes → [1, 3, crop, crop] (centre) or [1, 10, 3, crop, crop] (ten crops)."""
        return self.from_uint8(self.load(data, max_pixels=max_pixels).unsqueeze(0), crops)
