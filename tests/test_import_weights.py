"""Importing the published BVLC AlexNet weights (model/import_weights.py), without the internet.

Each test writes its own Caffe or ONNX file with the real layer names, field numbers and blob shapes
of the published files (random weights), using the small protobuf *writer* in tests/support/weights.py:
it is written from caffe.proto / onnx.proto independently of the importer's reader, so a wrong field
number on either side makes the tests fail rather than cancel out. The expected logits come from a plain
torch.nn.functional forward pass with Caffe's preprocessing done by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import random
import threading
from pathlib import Path

import pytest
import torch
from support.weights import (
    BGR_MEAN,
    alexnet_shapes,
    blob_4d,
    blob_shape,
    caffemodel,
    convert,
    f32_bytes,
    f_bytes,
    f_float,
    f_packed_varints,
    onnx_model,
    random_weights,
    reference_logits,
    sha256,
)

from model import CAFFE_LRN, load_checkpoint, load_image
from model import importers as iw
from model.importers import importing
from model.importers.download import ChecksumMismatch, DownloadError


def check_logits(checkpoint, weights, photo: Path, towers: bool = False) -> None:
    """Our net, built from the checkpoint and fed by the shared preprocessing, against the reference."""
    data = photo.read_bytes()
    x = checkpoint.preprocessor().from_bytes(data)
    assert x.shape == (1, 3, 227, 227)
    expected = reference_logits(weights, load_image(data))
    nets = [checkpoint.build_grouped().eval()] + ([checkpoint.build().eval()] if towers else [])
    for net in nets:
        with torch.no_grad():
            logits = net(x)
        assert logits.shape == expected.shape
        error = (logits - expected).abs().max() / expected.abs().max()
        assert error < 1e-4, f"{type(net).__name__}: relative error {error:.2e}"
        assert expected.std() > 1e-3 * expected.abs().max()  # the comparison is not between constants


def assert_imported_settings(checkpoint, source_bytes: bytes) -> None:
    p = checkpoint.preprocessing
    assert (p.crop, p.resize, p.channel_order, p.pixel_scale, p.std) == (227, 256, "BGR", 255.0, (1.0, 1.0, 1.0))
    assert p.mean == pytest.approx(BGR_MEAN)
    assert checkpoint.config.conv1_padding == "none"
    assert checkpoint.config.lrn == CAFFE_LRN  # read from the file: k=1, alpha=1e-4 in the alpha/n convention
    assert checkpoint.config.lrn_across_towers  # Caffe's LRN windows span both groups
    assert checkpoint.trained
    assert checkpoint.provenance["source_sha256"] == hashlib.sha256(source_bytes).hexdigest()
    assert checkpoint.provenance["source_sha1"] == hashlib.sha1(source_bytes).hexdigest()
    assert "val_top1_error" not in checkpoint.provenance  # not the published file: no published accuracy


@pytest.fixture
def small_weights():
    return random_weights(alexnet_shapes(scale=8), seed=1)


# ----------------------------------------------------------------------------------------- full-size files


@pytest.mark.slow
def test_full_size_v1_caffemodel(tmp_path, photos):
    """The published file's layout: V1 `layers`, 4-D blobs (fc weights 1×1×4096×9216), 60,965,224 weights."""
    weights = random_weights(alexnet_shapes(), seed=0)
    source = tmp_path / "bvlc_alexnet_random.caffemodel"
    source_bytes = caffemodel(weights, v1=True)
    source.write_bytes(source_bytes)
    out = tmp_path / "ckpt" / "alexnet.safetensors"
    assert iw.main([str(source), "--out", str(out), "--quiet", "--expected-sha1", hashlib.sha1(source_bytes).hexdigest()]) == 0
    del source_bytes
    checkpoint = load_checkpoint(out)
    assert sum(t.numel() for t in checkpoint.state_dict.values()) == 60_965_224
    assert checkpoint.provenance["source_format"] == "caffe (V1 layers)"
    assert_imported_settings(checkpoint, source.read_bytes())
    check_logits(checkpoint, weights, photos[0])


@pytest.mark.slow
def test_onnx(tmp_path, photos):
    """bvlcalexnet-12.onnx's layout (a quarter of the width): initializers conv1_w_0 … fc8_b_0 as raw
    little-endian float32."""
    weights = random_weights(alexnet_shapes(scale=4), seed=2)
    source = tmp_path / "alexnet_random.onnx"
    source.write_bytes(onnx_model(weights))
    out = tmp_path / "alexnet.safetensors"
    assert convert(source, out) == 0
    checkpoint = load_checkpoint(out)
    assert checkpoint.provenance["source_format"] == "onnx"
    assert_imported_settings(checkpoint, source.read_bytes())
    check_logits(checkpoint, weights, photos[4], towers=True)


# ----------------------------------------------------------------------------------------- other encodings


@pytest.mark.slow
@pytest.mark.parametrize("blob", [blob_shape, blob_4d], ids=["shape", "4d"])
def test_new_layer_format(tmp_path, photos, small_weights, blob):
    source = tmp_path / "net.caffemodel"
    source.write_bytes(caffemodel(small_weights, v1=False, blob=blob))
    out = tmp_path / "net.safetensors"
    assert convert(source, out) == 0
    checkpoint = load_checkpoint(out)
    assert checkpoint.provenance["source_format"] == "caffe (layer)"
    assert_imported_settings(checkpoint, source.read_bytes())
    check_logits(checkpoint, small_weights, photos[1], towers=True)


@pytest.mark.slow
def test_onnx_float_data_and_transposed_gemm(tmp_path, photos, small_weights):
    """float_data instead of raw_data; fc7 stored [in, out] with Gemm transB=0 (fc7 is square: only the
    graph says which way round it is)."""
    source = tmp_path / "net.onnx"
    source.write_bytes(onnx_model(small_weights, raw=False, fc7_transposed=True))
    out = tmp_path / "net.safetensors"
    assert convert(source, out) == 0
    check_logits(load_checkpoint(out), small_weights, photos[2])


@pytest.mark.slow
def test_unpacked_floats_and_format_sniffing(tmp_path, photos, small_weights):
    """Legal protobuf that Caffe does not write: small blobs with one fixed32 field per value, large ones
    as two packed runs (a parser must concatenate them); and files with no telling extension."""

    def unusual_blob(tensor):
        dims = f_bytes(7, f_packed_varints(1, tensor.shape))
        values = tensor.flatten()
        if values.numel() <= 5000:
            return dims + b"".join(f_float(5, v) for v in values.tolist())
        half = values.numel() // 2
        return dims + f_bytes(5, f32_bytes(values[:half])) + f_bytes(5, f32_bytes(values[half:]))

    tiny = random_weights(alexnet_shapes(scale=16), seed=3)
    source = tmp_path / "weights.bin"
    source.write_bytes(caffemodel(tiny, v1=False, blob=unusual_blob))
    out = tmp_path / "net.safetensors"
    assert convert(source, out) == 0
    check_logits(load_checkpoint(out), tiny, photos[3])
    onnx_source = tmp_path / "weights2.bin"
    onnx_source.write_bytes(onnx_model(small_weights))
    assert convert(onnx_source, out) == 0
    check_logits(load_checkpoint(out), small_weights, photos[3])


def test_other_class_count_needs_classes(tmp_path, capsys):
    weights = random_weights(alexnet_shapes(scale=8, classes=5), seed=4)
    source = tmp_path / "net.onnx"
    source.write_bytes(onnx_model(weights))
    out = tmp_path / "net.safetensors"
    assert convert(source, out) == 1
    assert "pass --classes" in capsys.readouterr().err
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"n0000000{i} thing {i}, stuff\n" for i in range(5)))
    assert convert(source, out, "--classes", str(classes)) == 0
    checkpoint = load_checkpoint(out)
    assert checkpoint.config.num_classes == 5 and checkpoint.classes[4].label == "thing 4"


def test_published_file_gets_published_accuracy(tmp_path, monkeypatch, small_weights):
    """A file whose checksum is a published one is verified by name and credited with Caffe's figures."""
    source = tmp_path / "bvlc_alexnet.caffemodel"
    source.write_bytes(caffemodel(small_weights, v1=True))
    sha1 = hashlib.sha1(source.read_bytes()).hexdigest()
    fake = iw.PublishedFile(source.name, "caffe", "http://example.invalid/x", 0, ("sha1", sha1), "BVLC AlexNet (test)")
    monkeypatch.setattr(importing, "PUBLISHED", (fake,))
    monkeypatch.setattr(importing, "PUBLISHED_BY_NAME", {fake.name: fake})
    out = tmp_path / "net.safetensors"
    assert iw.main([str(source), "--out", str(out), "--quiet"]) == 0
    p = load_checkpoint(out).provenance
    assert (p["val_top1_error"], p["val_top5_error"]) == (0.429, 0.198)
    assert p["source_verified"] == "published sha1" and p["source_name"] == "BVLC AlexNet (test)"


# ----------------------------------------------------------------------------------------- errors


def write_and_convert(tmp_path, capsys, payload: bytes, name="net.caffemodel") -> tuple[int, str, Path]:
    source = tmp_path / name
    source.write_bytes(payload)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous checkpoint")
    code = convert(source, out, "--force")  # --force: past the refusal to replace a non-import (below)
    assert out.read_bytes() == b"previous checkpoint"  # an error leaves --out as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.safetensors")]  # no temporary left
    return code, capsys.readouterr().err, out


def test_wrong_shape_is_a_clear_error(tmp_path, capsys, small_weights):
    bad = dict(small_weights)
    bad["fc7"] = (bad["fc7"][0][:, :-2], bad["fc7"][1])
    code, err, _ = write_and_convert(tmp_path, capsys, caffemodel(bad, v1=True))
    assert code == 1 and "fc7.weight has shape" in err


def test_missing_layer_is_a_clear_error(tmp_path, capsys, small_weights):
    bad = {k: v for k, v in small_weights.items() if k != "conv4"}
    code, err, _ = write_and_convert(tmp_path, capsys, onnx_model(bad), "net.onnx")
    assert code == 1 and "missing conv4.weight" in err and "missing conv4.bias" in err


def test_caffenet_layer_order_is_refused(tmp_path, capsys, small_weights):
    """bvlc_reference_caffenet has the same names and shapes but pools before LRN."""
    code, err, _ = write_and_convert(tmp_path, capsys, caffemodel(small_weights, v1=True, pool_first=True))
    assert code == 1 and "pools before it normalises" in err


NEITHER = "neither a Caffe .caffemodel nor an ONNX model"


@pytest.mark.parametrize(
    "payload, name, message",
    [
        (b"", "net.caffemodel", "no layers"),
        (b"\xff\xff\xff\xff garbage", "net.caffemodel", NEITHER),
        # a real file cut short, and one under a name that does not say its format
        ("truncated caffe", "net.caffemodel", "not a readable Caffe .caffemodel (field 2 at byte"),
        ("truncated onnx", "net.bin", "not a readable Caffe or ONNX model (field 7 at byte"),
        ("jpeg", "some.jpg", f"{NEITHER} (it looks like a JPEG image)"),
        ("random", "some.bin", f"{NEITHER} (its bytes are not a protobuf message"),
        (b"<!DOCTYPE html><html>Not Found</html>", "bvlc.caffemodel", f"{NEITHER} (it looks like an HTML"),
    ],
    ids=["empty", "garbage", "truncated", "truncated, no extension", "jpeg", "random bytes", "html"],
)
def test_unreadable_files(tmp_path, capsys, small_weights, photos, payload, name, message):
    if payload == "truncated caffe":
        full = caffemodel(small_weights, v1=True)
        payload = full[: len(full) // 2]
    elif payload == "truncated onnx":
        full = onnx_model(small_weights)
        payload = full[: len(full) // 2]
    elif payload == "jpeg":
        payload = photos[0].read_bytes()
    elif payload == "random":
        payload = random.Random(0).randbytes(4096)
        assert payload[:1] not in (b"\x08", b"\x0a", b"\x12", b"\xa2")  # not the start of a model file
    code, err, _ = write_and_convert(tmp_path, capsys, payload, name)
    assert code == 1 and message in err, err
    assert err.startswith(f"error: {tmp_path / name}: "), err  # which file
    if "not a readable" in message:
        assert "the file is cut short or damaged; download it again" in err
    if NEITHER in message:  # and what each accepted format looks like
        assert "protobuf NetParameter" in err and "protobuf ModelProto" in err, err


# ----------------------------------------------------------------------------------------- --out already there


def trained_checkpoint(tmp_path, small_weights, path: Path, **provenance) -> Path:
    """A checkpoint as training writes it (``source``: ``python -m training train``), in ``path``."""
    source = tmp_path / "for-training.onnx"
    source.write_bytes(onnx_model(small_weights))
    assert convert(source, path) == 0
    checkpoint = load_checkpoint(path)
    checkpoint.provenance = {"trained": True, "source": "python -m training train", **provenance}
    checkpoint.save(path)
    return path


@pytest.mark.slow
def test_a_checkpoint_from_training_is_not_replaced_without_force(tmp_path, capsys, small_weights):
    out = trained_checkpoint(tmp_path, small_weights, tmp_path / "best.safetensors", epoch=12, val_top1_error=0.412)
    before = out.read_bytes()
    source = tmp_path / "net.caffemodel"
    source.write_bytes(caffemodel(small_weights, v1=True))
    capsys.readouterr()
    assert convert(source, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds a checkpoint trained by `python -m training train`, epoch 12, "
                          "val top-1 error 41.2%"), err
    assert "--force" in err
    assert out.read_bytes() == before
    # A URL is refused before anything is downloaded (no server at all: a download would fail with 3).
    assert iw.main(["http://127.0.0.1:9/bvlc_alexnet.caffemodel", "--out", str(out), "--quiet"]) == 2
    assert out.read_bytes() == before

    assert convert(source, out, "--force") == 0
    assert load_checkpoint(out).provenance["imported_by"] == "model.import_weights"


@pytest.mark.slow
def test_an_earlier_import_is_replaced_without_force(tmp_path, capsys, small_weights):
    out = tmp_path / "best.safetensors"
    first = tmp_path / "net.onnx"
    first.write_bytes(onnx_model(small_weights))
    assert convert(first, out) == 0
    second = tmp_path / "net.caffemodel"
    second.write_bytes(caffemodel(random_weights(alexnet_shapes(scale=8), seed=2), v1=True))
    capsys.readouterr()
    assert iw.main([str(second), "--out", str(out), "--expected-sha256", sha256(second)]) == 0
    captured = capsys.readouterr()
    assert f"replaced {out}: an earlier import (of net.onnx)" in captured.err
    assert load_checkpoint(out).provenance["source"] == str(second.resolve())


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, what",
    [
        ("jpeg", "a file that is not a readable checkpoint (not a safetensors file"),
        (b"my notes about the run", "a file that is not a readable checkpoint (not a safetensors file"),
        ("other", "a checkpoint of unknown origin (source: somewhere else)"),
    ],
    ids=["a JPEG", "a text file", "a checkpoint from elsewhere"],
)
def test_anything_else_at_out_is_not_replaced_without_force(tmp_path, capsys, small_weights, photos, content, what):
    out = tmp_path / "best.safetensors"
    if content == "jpeg":
        out.write_bytes(photos[0].read_bytes())
    elif content == "other":
        trained_checkpoint(tmp_path, small_weights, out)
        checkpoint = load_checkpoint(out)
        checkpoint.provenance = {"trained": True, "source": "somewhere else"}
        checkpoint.save(out)
    else:
        out.write_bytes(content)
    before = out.read_bytes()
    source = tmp_path / "net.onnx"
    source.write_bytes(onnx_model(small_weights))
    capsys.readouterr()
    assert convert(source, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds {what}") and "--force" in err, err
    if content == "jpeg":
        assert "it looks like a JPEG image" in err
    assert out.read_bytes() == before
    assert convert(source, out, "--force") == 0
    assert load_checkpoint(out).provenance["imported_by"] == "model.import_weights"


def test_the_help_says_what_out_may_replace(capsys):
    with pytest.raises(SystemExit):
        iw.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--force" in text and "only when it is an earlier import" in text


def test_local_checksum_mismatch(tmp_path, capsys, small_weights):
    source = tmp_path / "net.onnx"
    source.write_bytes(onnx_model(small_weights))
    out = tmp_path / "out.safetensors"
    assert iw.main([str(source), "--out", str(out), "--quiet", "--expected-sha1", "0" * 40]) == 1
    assert "sha1 is" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------------------- URLs


class _Server(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    truncate: set[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.server.truncate:  # announce the whole file, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.truncate = {}, set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.mark.slow
def test_url_download(tmp_path, capsys, server, photos, small_weights):
    httpd, base = server
    body = onnx_model(small_weights)
    httpd.files["/models/net.onnx"] = body
    out = tmp_path / "net.safetensors"
    sha = hashlib.sha256(body).hexdigest()
    assert iw.main([f"{base}/models/net.onnx", "--out", str(out), "--expected-sha256", sha]) == 0
    captured = capsys.readouterr()
    assert "downloading net.onnx: 100%" in captured.err  # the progress bar (stderr is not a terminal here)
    assert "wrote" in captured.out
    assert load_checkpoint(out).provenance["source"] == f"{base}/models/net.onnx"
    check_logits(load_checkpoint(out), small_weights, photos[5])


@pytest.mark.slow
def test_url_checksum_mismatch_against_published(tmp_path, capsys, server, small_weights):
    """A download named like the published caffemodel is checked against BVLC's sha1 by default."""
    httpd, base = server
    httpd.files["/bvlc_alexnet.caffemodel"] = caffemodel(small_weights, v1=True)
    out = tmp_path / "net.safetensors"
    assert iw.main([f"{base}/bvlc_alexnet.caffemodel", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "expected 9116a64c0fbe4459d18f4bb6b56d647b63920377" in err
    assert not out.exists()


@pytest.mark.slow
def test_url_unknown_file_needs_a_checksum(tmp_path, capsys, server, small_weights):
    httpd, base = server
    httpd.files["/x.onnx"] = onnx_model(small_weights)
    out = tmp_path / "net.safetensors"
    assert iw.main([f"{base}/x.onnx", "--out", str(out), "--quiet"]) == 1
    assert "--expected-sha256" in capsys.readouterr().err and not out.exists()
    assert iw.main([f"{base}/x.onnx", "--out", str(out), "--quiet", "--allow-unverified"]) == 0
    assert load_checkpoint(out).provenance["source_verified"].startswith("not verified")


@pytest.mark.slow
def test_truncated_download(tmp_path, server, small_weights):
    httpd, base = server
    body = onnx_model(small_weights)
    httpd.files["/net.onnx"] = body
    httpd.truncate.add("/net.onnx")
    out = tmp_path / "net.safetensors"
    with pytest.raises(DownloadError, match="truncated|connection failed"):
        iw.import_weights(f"{base}/net.onnx", out, expected={"sha256": hashlib.sha256(body).hexdigest()}, progress=None)
    assert not out.exists()


@pytest.mark.slow
def test_http_error_and_no_server(tmp_path, capsys, server):
    _, base = server
    out = tmp_path / "net.safetensors"
    assert iw.main([f"{base}/missing.onnx", "--out", str(out), "--quiet", "--allow-unverified"]) == 3
    assert "HTTP 404" in capsys.readouterr().err
    with pytest.raises(DownloadError, match="cannot connect"):
        iw.import_weights("http://127.0.0.1:9/x.onnx", out, allow_unverified=True, progress=None, timeout=5)
    assert not out.exists()
    with pytest.raises(ChecksumMismatch):
        iw.import_weights("http://127.0.0.1:9/x.onnx", out, progress=None)  # refused before any network use


# ----------------------------------------------------------------------------------------- LRN and towers


@pytest.mark.slow
@pytest.mark.parametrize("across", [False, True], ids=["paper-per-tower", "caffe-across"])
def test_towers_and_grouped_agree_on_lrn_span(across):
    """With weights and inputs large enough for LRN to bite, the two-tower and grouped forms still agree,
    for either LRN span; and the span matters (the comparison would catch a form that ignores it)."""
    from model import AlexNet

    torch.manual_seed(5)
    net = AlexNet(width=0.25, lrn=CAFFE_LRN, conv1_padding="none", lrn_across_towers=across).eval()
    weights = random_weights(alexnet_shapes(scale=4), seed=6)
    grouped_state = {f"{n}.{k}": t for n, (w, b) in weights.items() for k, t in (("weight", w), ("bias", b))}
    net.load_grouped_state_dict(grouped_state)
    grouped = net.to_grouped().eval()
    x = torch.rand(2, 3, 227, 227) * 255 - 120
    with torch.no_grad():
        towers_logits, grouped_logits = net(x), grouped(x)
        grouped.config = dataclasses.replace(grouped.config, lrn_across_towers=not across)
        other_span = grouped(x)
    torch.testing.assert_close(towers_logits, grouped_logits, rtol=1e-4, atol=1e-4 * grouped_logits.abs().max().item())
    assert (other_span - grouped_logits).abs().max() > 1e-3 * grouped_logits.abs().max()
