"""The checkpoint artifact: layout, metadata, round trip, atomic writes, and clear errors for bad files."""

import json
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

import model.checkpoint as checkpoint_module
from model import (
    CAFFE_LRN,
    AlexNet,
    Checkpoint,
    CheckpointError,
    ImageClass,
    Preprocessing,
    imagenet_classes,
    load_checkpoint,
)

CLASSES = tuple(ImageClass(f"n{i:08d}", f"class {i}, synonym") for i in range(10))


def small_checkpoint(**fields) -> Checkpoint:
    torch.manual_seed(0)
    net = AlexNet(num_classes=10, width=0.125)
    fields.setdefault("classes", CLASSES)
    return Checkpoint.from_model(net, **fields)


@pytest.fixture(scope="module")
def paper_checkpoint_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "paper.safetensors"
    mean = torch.rand(3, 256, 256) * 255
    pca = {"eigenvalues": [0.2, 0.02, 0.005], "eigenvectors": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "alpha_std": 0.1}
    Checkpoint.from_model(
        AlexNet(),
        preprocessing=Preprocessing(mean="image"),
        mean_image=mean,
        pca=pca,
        provenance={"trained": True, "epoch": 3, "val_top1_error": 0.5, "val_top5_error": 0.25},
        training={"lr": 0.01},
    ).save(path)
    return path


@pytest.mark.slow
def test_file_layout_is_caffes_grouped_shapes_plus_json_metadata(paper_checkpoint_file):
    with safetensors.safe_open(str(paper_checkpoint_file), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        header = f.metadata()
    assert shapes == {
        "conv1.weight": [96, 3, 11, 11], "conv1.bias": [96],
        "conv2.weight": [256, 48, 5, 5], "conv2.bias": [256],
        "conv3.weight": [384, 256, 3, 3], "conv3.bias": [384],
        "conv4.weight": [384, 192, 3, 3], "conv4.bias": [384],
        "conv5.weight": [256, 192, 3, 3], "conv5.bias": [256],
        "fc6.weight": [4096, 9216], "fc6.bias": [4096],
        "fc7.weight": [4096, 4096], "fc7.bias": [4096],
        "fc8.weight": [1000, 4096], "fc8.bias": [1000],
        "mean_image": [3, 256, 256],
    }  # fmt: skip
    assert header["format"] == "alexnet-checkpoint" and header["format_version"] == "1"
    meta = json.loads(header["alexnet"])
    arch = meta["architecture"]
    assert arch["lrn"] == {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0, "alpha_over_size": False}
    assert (arch["conv1_padding"], arch["width"], arch["num_classes"]) == ("overhang", 1.0, 1000)
    assert meta["classes"][0] == {"wnid": "n01440764", "name": "tench, Tinca tinca"}
    assert len(meta["classes"]) == 1000
    assert meta["preprocessing"]["resize"] == 256 and meta["preprocessing"]["crop"] == 224
    assert meta["preprocessing"]["mean"] == "image" and meta["preprocessing"]["channel_order"] == "RGB"
    assert meta["pca"]["alpha_std"] == 0.1
    provenance = meta["provenance"]
    assert provenance["epoch"] == 3 and provenance["val_top1_error"] == 0.5
    assert provenance["created"].startswith("20") and provenance["code_version"].startswith("0.")


@pytest.mark.slow
def test_round_trip_keeps_weights_and_metadata(paper_checkpoint_file):
    loaded = load_checkpoint(paper_checkpoint_file)
    assert loaded.trained and loaded.classes == imagenet_classes()
    assert loaded.mean_image.shape == (3, 256, 256)
    assert loaded.training == {"lr": 0.01}
    assert len(loaded.sha256) == 64
    net = loaded.build().eval()
    grouped = loaded.build_grouped().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x), grouped(x), atol=1e-5, rtol=1e-5)


def test_other_lrn_constants_and_padding_round_trip(tmp_path):
    net = AlexNet(num_classes=10, width=0.125, conv1_padding="none", lrn=CAFFE_LRN)
    Checkpoint.from_model(
        net, classes=CLASSES, preprocessing=Preprocessing(crop=227, channel_order="BGR", mean=(104.0, 116.7, 122.7))
    ).save(tmp_path / "caffe.safetensors")
    loaded = load_checkpoint(tmp_path / "caffe.safetensors")
    assert loaded.config.lrn == CAFFE_LRN and loaded.config.conv1_padding == "none"
    assert loaded.preprocessing.channel_order == "BGR" and loaded.preprocessing.crop == 227
    assert loaded.build().towers[0].lrn.config.coefficient == pytest.approx(2e-5)
    for k, v in net.grouped_state_dict().items():
        assert torch.equal(loaded.state_dict[k], v), k


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    small_checkpoint(provenance={"epoch": 1}).save(path)
    before = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="No space"):
        small_checkpoint(provenance={"epoch": 2}).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temporary file left behind


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as e:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "ck.safetensors"
    small_checkpoint().save(path)
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"ck\.safetensors: .*(short|truncated)"):
            load_checkpoint(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (pickle.dumps({"conv1.weight": [1.0]}), "not a safetensors file"),
        (b"\x00" * 64, "not a safetensors file"),
        (b"<html>not found</html>", "not a safetensors file"),
        (struct.pack("<Q", 10**12) + b"{}", "header claims"),
    ],
)
def test_foreign_files(tmp_path, content, message):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_plain_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not an AlexNet checkpoint"):
        load_checkpoint(path)


def rewrite(path: Path, tensors=None, **meta_changes) -> None:
    """Re-save a checkpoint with edited tensors or metadata, bypassing Checkpoint.validate."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    header.update(meta_changes)
    safetensors.torch.save_file(data, str(path), metadata=header)


def test_unknown_format_version(tmp_path):
    path = tmp_path / "ck.safetensors"
    small_checkpoint().save(path)
    rewrite(path, format_version="99")
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "ck.safetensors"
    small_checkpoint().save(path)
    rewrite(path, tensors={"fc6.weight": torch.zeros(5, 5)})
    with pytest.raises(CheckpointError, match=r"fc6\.weight has shape \[5, 5\], expected"):
        load_checkpoint(path)


def test_non_finite_weights_are_rejected(tmp_path):
    path = tmp_path / "ck.safetensors"
    ck = small_checkpoint()
    ck.save(path)
    bad = ck.state_dict["conv3.bias"].clone()
    bad[0] = float("nan")
    rewrite(path, tensors={"conv3.bias": bad})
    with pytest.raises(CheckpointError, match="conv3.bias holds NaN"):
        load_checkpoint(path)


def test_incomplete_metadata(tmp_path):
    path = tmp_path / "ck.safetensors"
    small_checkpoint().save(path)
    rewrite(path, alexnet=json.dumps({"architecture": {}}))
    with pytest.raises(CheckpointError, match="metadata is incomplete"):
        load_checkpoint(path)


def test_inconsistent_checkpoints_are_refused_when_saving(tmp_path):
    with pytest.raises(CheckpointError, match="3 classes listed for a 10-way net"):
        small_checkpoint(classes=CLASSES[:3]).save(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="expects 224 px"):
        small_checkpoint(preprocessing=Preprocessing(crop=227, mean=(0, 0, 0))).save(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="mean image"):
        small_checkpoint(preprocessing=Preprocessing(mean="image")).save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_imagenet_classes_are_shipped_in_index_order():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert [c.wnid for c in classes] == sorted(c.wnid for c in classes)
    assert classes[0] == ImageClass("n01440764", "tench, Tinca tinca") and classes[0].label == "tench"
    cranes = [c.wnid for c in classes if c.label == "crane"]
    assert len(cranes) == 2 and len(set(cranes)) == 2
