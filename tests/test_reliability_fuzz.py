"""Fuzzing, for a fixed budget: the decode/preprocess path and checkpoint loading with hypothesis (the HTTP
API: Schemathesis, in tests/test_service_schema.py).

The decode path (``Preprocessor.from_bytes``, the service's, and ``load_image``, prepare's) gets arbitrary
bytes, mutated valid images of every accepted format, and valid images of every mode Pillow writes. The
only exceptions allowed out are ``model.ImageError`` subclasses (which the service turns into 4xx); every
result has the right shape, dtype and finite values; every valid image is accepted.

The budget is fixed and the inputs derandomized, so CI runs the same examples every time. For a longer,
random hunt: ``ALEXNET_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_reliability_fuzz.py``.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from model import ImageError, Preprocessing, Preprocessor, load_image
from model.preprocessing import IMAGENET_RGB_MEAN
from service.problems import image_problem

# Pillow warns about the damage it works around (corrupt EXIF, tags past the end): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = int(os.environ.get("ALEXNET_FUZZ_EXAMPLES", "0"))  # 0: the fixed CI budget below


def budget(ci_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or ci_examples,
        derandomize=not EXAMPLES,
        deadline=None,  # CI machines are shared: a time bound per example would be flaky
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None,
    )


# Decode and preprocess ------------------------------------------------------------------------------------

PREPROCESSOR = Preprocessor(Preprocessing(mean=IMAGENET_RGB_MEAN))
MAX_PIXELS = 4_000_000  # mutated headers may declare big images; this keeps each example fast


def picture(size=(24, 18)) -> Image.Image:
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste((200, 30, 30), (2, 2, size[0] // 2, size[1] // 2))
    return image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def seeds() -> list[bytes]:
    """Small valid files of every accepted format, the starting points for mutation."""
    p = picture()
    frames = [p, p.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(p, "JPEG", quality=80),
        encode(p, "JPEG", quality=80, progressive=True),
        encode(p.convert("CMYK"), "JPEG"),
        encode(p, "JPEG", exif=exif),
        (CORPUS / "arithmetic.jpg").read_bytes(),
        encode(p, "PNG"),
        encode(p.convert("P"), "PNG", transparency=0),
        encode(p.convert("RGBA"), "PNG"),
        encode(p.convert("I").convert("I;16"), "PNG"),
        encode(p, "GIF"),
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encode(p, "WEBP", quality=50),
        encode(p, "WEBP", lossless=True),
        encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        encode(p, "TIFF"),
        encode(p, "TIFF", compression="tiff_lzw"),
        encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        encode(p, "BMP"),
        encode(p.convert("P"), "BMP"),
    ]


SEEDS = seeds()
EXTREMES = [0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def mutated_images(draw) -> bytes:
    """A seed with a few mutations: byte flips, extreme 16/32-bit values (sizes, lengths, offsets),
    insertions, deletions, truncation."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "byte", "u16", "u32", "insert", "delete", "truncate"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind in ("u16", "u32"):
            width = 2 if kind == "u16" else 4
            value = draw(st.sampled_from(EXTREMES)) & ((1 << (8 * width)) - 1)
            order = draw(st.sampled_from("<>"))
            data[at : at + width] = struct.pack(order + ("H" if width == 2 else "I"), value)
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            del data[max(at, 1) :]
        if not data:
            break
    return bytes(data)


def check_preprocessing(data: bytes, crops: str) -> None:
    """from_bytes either answers the right tensor or raises an ImageError; nothing else."""
    try:
        x = PREPROCESSOR.from_bytes(data, crops, max_pixels=MAX_PIXELS)
    except ImageError as e:
        assert 400 <= image_problem(e, "image").status < 500 and str(e)
        return
    expected = (1, 3, 224, 224) if crops == "center" else (1, 10, 3, 224, 224)
    assert tuple(x.shape) == expected and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def check_load_image(data: bytes) -> None:
    try:
        x = load_image(data, max_pixels=MAX_PIXELS)
    except ImageError:
        return
    assert tuple(x.shape) == (3, 256, 256) and x.dtype == torch.uint8 and x.is_contiguous()


@budget(150)
@given(data=st.binary(max_size=2048), crops=st.sampled_from(["center", "ten"]))
def test_arbitrary_bytes(data, crops):
    check_preprocessing(data, crops)


@budget(150)
@given(data=st.sampled_from([s[:16] for s in SEEDS]).flatmap(lambda head: st.binary(max_size=512).map(head.__add__)))
def test_a_valid_signature_followed_by_garbage(data):
    check_preprocessing(data, "center")


@pytest.mark.slow
@budget(500)
@given(data=mutated_images(), crops=st.sampled_from(["center", "ten"]))
def test_mutated_images(data, crops):
    check_preprocessing(data, crops)
    check_load_image(data)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F"]
FORMATS = {"JPEG": {}, "PNG": {}, "GIF": {}, "WEBP": {"lossless": True}, "TIFF": {}, "BMP": {}}


@pytest.mark.slow
@budget(150)
@given(
    mode=st.sampled_from(MODES),
    fmt=st.sampled_from(sorted(FORMATS)),
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_every_valid_image_is_accepted(mode, fmt, width, height, seed):
    """Any image Pillow writes in an accepted format, in any mode and size, is preprocessed without error."""
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    image = Image.fromarray(rgb.numpy(), "RGB")
    try:
        source = image.convert(mode) if mode not in ("I;16", "PA") else image.convert("L" if mode == "I;16" else "P")
        if mode == "I;16":
            source = source.convert("I").point(lambda v: v * 257).convert("I;16")
        elif mode == "PA":
            source = source.convert("PA")
        data = encode(source, fmt, **FORMATS[fmt])
    except (OSError, ValueError, KeyError):
        assume(False)  # Pillow cannot write this mode in this format (JPEG has no alpha, …)
    x = PREPROCESSOR.from_bytes(data, "center")  # no ImageError allowed
    assert tuple(x.shape) == (1, 3, 224, 224) and torch.isfinite(x).all()


# Checkpoints --------------------------------------------------------------------------------------------


def small_checkpoint() -> bytes:
    import tempfile

    from model import AlexNet, Checkpoint, ImageClass

    classes = tuple(ImageClass(f"n{i:08d}", f"class {i}") for i in range(3))
    net = AlexNet(3, width=1 / 32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.safetensors"
        Checkpoint.from_model(net, classes=classes, provenance={"trained": True}).save(path)
        return path.read_bytes()


CHECKPOINT = small_checkpoint()
HEADER_END = 8 + struct.unpack("<Q", CHECKPOINT[:8])[0]


@st.composite
def mutated_checkpoints(draw) -> bytes:
    """The checkpoint with its JSON header edited as text (numbers, punctuation), its length prefix or tensor
    bytes changed, and then perhaps cut short or extended."""
    data = bytearray(CHECKPOINT)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["header-digit", "header-byte", "length", "data"]))
        header_end = 8 + struct.unpack("<Q", CHECKPOINT[:8])[0] - (len(CHECKPOINT) - len(data))
        if kind == "header-digit":
            digits = [i for i in range(8, min(header_end, len(data))) if chr(data[i]).isdigit()]
            if digits:
                at = draw(st.sampled_from(digits))
                data[at : at + 1] = draw(st.sampled_from([b"0", b"9", b"99999999999", b"-1", b"", b'"x"', b"1e308"]))
        elif kind == "header-byte":
            data[draw(st.integers(8, header_end - 1))] = draw(st.sampled_from(b'{}[]",:0 a'))
        elif kind == "length":
            value = draw(st.sampled_from([0, 1, HEADER_END - 9, HEADER_END - 7, 2**31, 2**63, 2**64 - 1]))
            data[:8] = struct.pack("<Q", value)
        else:
            at = draw(st.integers(HEADER_END, len(CHECKPOINT) - 4)) - (len(CHECKPOINT) - len(data))
            data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"]))
    end = draw(st.sampled_from(["keep", "truncate", "append"]))
    if end == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif end == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@pytest.mark.slow
@budget(300)
@given(data=mutated_checkpoints())
def test_a_damaged_checkpoint_is_a_checkpoint_error(data, tmp_path_factory):
    """load_checkpoint either returns a usable checkpoint or raises CheckpointError: never anything else,
    which the service's start-up, hot reload and training's evaluate would not recognise."""
    from model import CheckpointError, load_checkpoint

    path = tmp_path_factory.getbasetemp() / "fuzzed.safetensors"
    path.write_bytes(data)
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return
    checkpoint.build_grouped("cpu")  # what it loaded fits the architecture it declares
