"""ONNX export (model/export/), checked by running the exported files in ONNX Runtime.

Our own checkpoints (224 crops, conv1 "overhang" padding, LRN per tower, the paper's α convention, a mean
image) and BVLC-style imported ones (227, unpadded, LRN across both towers, BGR, Caffe's k=1 α/n) give
the same top-5 and probabilities within 1e-4 as our net, on the ten photos through each checkpoint's own
preprocessing. Most nets are scaled down; one is full width.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from support.service import write_checkpoint
from support.weights import alexnet_shapes, convert, onnx_model, random_weights

from model import (
    CAFFE_LRN,
    PAPER_LRN,
    AlexNet,
    AlexNetConfig,
    Checkpoint,
    ImageClass,
    LRNConfig,
    Preprocessing,
    imagenet_classes,
    load_checkpoint,
)
from model import export as ex
from model.export import onnx_file

REPO = Path(__file__).resolve().parents[1]


def he_init_(checkpoint: Checkpoint, seed: int) -> Checkpoint:
    """He-scaled weights (as tests/test_service_support.write_checkpoint): outputs that depend clearly on
    the input, so that top-5 orders are not decided by rounding."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in checkpoint.state_dict.items():
        if name.endswith(".weight"):
            tensor.normal_(0.0, math.sqrt(2.0 / tensor[0].numel()), generator=generator)
        else:
            tensor.normal_(0.0, 0.1, generator=generator)
    return checkpoint


def make_checkpoint(seed=0, *, width=0.125, num_classes=1000, mean_image=False, **config) -> Checkpoint:
    net = AlexNet(num_classes, width=width, **config)
    crop = net.config.input_size
    classes = (
        imagenet_classes()
        if num_classes == 1000
        else tuple(ImageClass(f"n{i:08d}", f"c{i}") for i in range(num_classes))
    )
    preprocessing = (
        Preprocessing(crop=crop, mean="image") if mean_image else Preprocessing(crop=crop, mean=(120, 115, 100))
    )
    mean = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 255 if mean_image else None
    checkpoint = Checkpoint.from_model(net, classes=classes, preprocessing=preprocessing, mean_image=mean,
                                       provenance={"trained": True, "epoch": 3})  # fmt: skip
    return he_init_(checkpoint, seed)


def photo_batch(checkpoint: Checkpoint, photos) -> torch.Tensor:
    pre = checkpoint.preprocessor()
    return torch.cat([pre.from_bytes(p.read_bytes()) for p in photos])


@torch.inference_mode()
def our_probabilities(checkpoint: Checkpoint, x: torch.Tensor) -> torch.Tensor:
    return checkpoint.build_grouped().eval()(x).softmax(1)


def run(session, x: torch.Tensor) -> torch.Tensor:
    (out,) = session.run(None, {"image": x.numpy()})
    return torch.from_numpy(out)


def assert_same_predictions(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    assert torch.equal(got.topk(5).indices, expected.topk(5).indices)
    difference = (got - expected).abs().max().item()
    assert difference < 1e-4, difference
    assert expected.max() > 10 / expected.shape[1]  # not a flat softmax: the top-5 comparison means something


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Checkpoint:
    """Ours: 224, overhang, LRN per tower (paper's α convention), a mean image; 1/4 width."""
    path = write_checkpoint(tmp_path_factory.mktemp("own") / "own.safetensors", seed=5, width=0.25, mean_image=True)
    checkpoint = load_checkpoint(path)
    c = checkpoint.config
    assert (c.input_size, c.conv1_padding, c.lrn_across_towers, c.lrn.alpha_over_size) == (
        224,
        "overhang",
        False,
        False,
    )
    return checkpoint


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Checkpoint:
    """BVLC-style, through the real importer from an ONNX model-zoo-like file the test writes: 1/4 width."""
    directory = tmp_path_factory.mktemp("imported")
    source = directory / "bvlcalexnet.onnx"
    source.write_bytes(onnx_model(random_weights(alexnet_shapes(scale=4), seed=2)))
    assert convert(source, directory / "imported.safetensors") == 0
    checkpoint = load_checkpoint(directory / "imported.safetensors")
    c, p = checkpoint.config, checkpoint.preprocessing
    assert (c.input_size, c.conv1_padding, c.lrn_across_towers, c.lrn, p.channel_order) == (
        227, "none", True, CAFFE_LRN, "BGR")  # fmt: skip
    return checkpoint


@pytest.fixture(scope="module")
def own_exported(own, tmp_path_factory) -> ex.Exported:
    return ex.export(own, tmp_path_factory.mktemp("own_onnx") / "alexnet.onnx")


# ------------------------------------------------------------------------------------ the same predictions


@pytest.mark.slow
def test_own_checkpoint_on_the_photos(own, own_exported, photos):
    x = photo_batch(own, photos)
    assert x.shape == (10, 3, 224, 224)
    session = ex.onnxruntime_session(own_exported.path)
    assert_same_predictions(run(session, x).softmax(1), our_probabilities(own, x))
    # per-tower LRN as Reshape → LRN → Reshape; the paper's α=1e-4 (α convention) as ONNX's α/n: 5e-4
    model = onnx.load(str(own_exported.path))
    lrns = [n for n in model.graph.node if n.op_type == "LRN"]
    assert len(lrns) == 2 and sum(n.op_type == "Reshape" for n in model.graph.node) == 4
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in lrns[0].attribute}
    assert attributes == pytest.approx({"size": 5, "alpha": 5e-4, "beta": 0.75, "bias": 2.0})
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in conv1.attribute}["pads"] == [0, 0, 3, 3]
    assert not {n.op_type for n in model.graph.node} - {"Conv", "Relu", "LRN", "Reshape", "MaxPool", "Flatten", "Gemm"}


@pytest.mark.slow
def test_imported_checkpoint_on_the_photos(imported, tmp_path, photos):
    exported = ex.export(imported, tmp_path / "bvlc.onnx")
    assert exported.mean_image_path is None  # a per-channel mean: the numbers are in the metadata
    x = photo_batch(imported, photos)
    assert x.shape == (10, 3, 227, 227)
    assert_same_predictions(run(ex.onnxruntime_session(exported.path), x).softmax(1), our_probabilities(imported, x))
    model = onnx.load(str(exported.path))
    lrns = [n for n in model.graph.node if n.op_type == "LRN"]  # one LRN over all maps, as Caffe's
    assert len(lrns) == 2 and not [n for n in model.graph.node if n.op_type == "Reshape"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in lrns[0].attribute}
    assert attributes == pytest.approx({"size": 5, "alpha": 1e-4, "beta": 0.75, "bias": 1.0})  # as in the zoo's file
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in conv1.attribute}["pads"] == [0, 0, 0, 0]


@pytest.mark.slow
def test_full_width_on_the_photos(photos):
    """The paper's net at full size (60,965,224 weights), built in memory: ~10 s."""
    checkpoint = make_checkpoint(7, width=1.0, mean_image=True)
    assert sum(t.numel() for t in checkpoint.state_dict.values()) == 60_965_224
    data = ex.build_model(checkpoint).SerializeToString()
    x = photo_batch(checkpoint, photos)
    assert_same_predictions(run(ex.onnxruntime_session(data), x).softmax(1), our_probabilities(checkpoint, x))


OTHER_LRN = LRNConfig(size=3, alpha=3e-3, beta=0.6, k=1.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "padding, across, lrn",
    [
        ("overhang", False, CAFFE_LRN),
        ("overhang", True, OTHER_LRN),
        ("symmetric", False, OTHER_LRN),
        ("symmetric", True, PAPER_LRN),
        ("none", False, PAPER_LRN),
        ("none", True, CAFFE_LRN),
    ],
)
def test_every_padding_and_lrn_setting(padding, across, lrn):
    checkpoint = make_checkpoint(11, num_classes=10, conv1_padding=padding, lrn=lrn, lrn_across_towers=across)
    model = ex.build_model(checkpoint, opset=ex.MIN_OPSET if across else ex.DEFAULT_OPSET)
    assert ex.verify_with_onnxruntime(model.SerializeToString(), checkpoint, batch=3) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("change", ["lrn_across_towers", "alpha convention"])
def test_the_comparison_can_fail(change):
    """A graph with the other LRN convention is caught: the checks above are not between look-alikes."""
    checkpoint = make_checkpoint(3)
    config = checkpoint.config
    if change == "lrn_across_towers":
        wrong = dataclasses.replace(config, lrn_across_towers=True)
    else:
        wrong = dataclasses.replace(config, lrn=dataclasses.replace(config.lrn, alpha_over_size=True))
    data = ex.build_model(dataclasses.replace(checkpoint, config=wrong)).SerializeToString()
    with pytest.raises(ex.ExportError, match="does not match the net's"):
        ex.verify_with_onnxruntime(data, checkpoint)


# -------------------------------------------------------------------------- batch, softmax, metadata, Triton


@pytest.mark.slow
def test_dynamic_batch(own, own_exported, photos):
    model = onnx.load(str(own_exported.path))
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    session = ex.onnxruntime_session(own_exported.path)
    x = photo_batch(own, photos)
    expected = our_probabilities(own, x)
    one = run(session, x[3:4]).softmax(1)
    seven = run(session, x[:7]).softmax(1)
    assert one.shape == (1, 1000) and seven.shape == (7, 1000)
    assert_same_predictions(one, expected[3:4])
    assert_same_predictions(seven, expected[:7])


@pytest.mark.slow
def test_softmax_output(own, tmp_path, photos):
    exported = ex.export(own, tmp_path / "p.onnx", softmax=True)
    session = ex.onnxruntime_session(exported.path)
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    x = photo_batch(own, photos)
    probabilities = run(session, x)
    assert torch.allclose(probabilities.sum(1), torch.ones(10), atol=1e-5)
    assert (probabilities >= 0).all()
    assert_same_predictions(probabilities, our_probabilities(own, x))


def test_metadata_round_trip(own, own_exported):
    """What a client of ONNX Runtime reads back: the checkpoint's classes, preprocessing, architecture."""
    props = ex.onnxruntime_session(own_exported.path).get_modelmeta().custom_metadata_map
    assert props["format"] == "alexnet-onnx" and props["format_version"] == "1"
    classes = tuple(ImageClass(c["wnid"], c["name"]) for c in json.loads(props["classes"]))
    assert classes == own.classes and len(classes) == 1000
    assert Preprocessing.from_dict(json.loads(props["preprocessing"])) == own.preprocessing
    assert AlexNetConfig.from_dict(json.loads(props["architecture"])) == own.config
    assert json.loads(props["provenance"]) == own.provenance
    export = json.loads(props["export"])
    assert export["checkpoint"] == "own.safetensors" and export["checkpoint_sha256"] == own.sha256
    assert export["input"] == {"name": "image", "shape": ["batch", 3, 224, 224], "dtype": "float32"}
    assert export["output"]["name"] == "logits" and export["opset"] == ex.DEFAULT_OPSET
    # the mean image, beside the model, as the metadata describes it
    mean_file = export["mean_image_file"]
    assert mean_file["name"] == "alexnet.mean_image.npy" == own_exported.mean_image_path.name
    mean = np.load(own_exported.mean_image_path)
    assert mean.dtype == np.float32 and list(mean.shape) == mean_file["shape"] == [3, 256, 256]
    assert torch.equal(torch.from_numpy(mean), own.mean_image)
    import hashlib

    assert hashlib.sha256(own_exported.mean_image_path.read_bytes()).hexdigest() == mean_file["sha256"]
    assert "minus the mean image (the file alexnet.mean_image.npy" in props["input"]
    assert ex.read_metadata(onnx.load(str(own_exported.path)))["preprocessing"] == own.preprocessing.to_dict()


def model_config_class():
    """A subset of Triton's ModelConfig (names, numbers and types from triton-inference-server/common,
    protobuf/model_config.proto): enough to parse what we write, strictly (an unknown field fails)."""
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference", syntax="proto3")
    data_type = proto.enum_type.add(name="DataType")
    for number, name in enumerate(["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                   "INT32", "INT64", "FP16", "FP32", "FP64", "STRING", "BF16"]):  # fmt: skip
        data_type.value.add(name=f"TYPE_{name}", number=number)

    def message(name, fields, enums=()):
        m = proto.message_type.add(name=name)
        for enum_name, values in enums:
            e = m.enum_type.add(name=enum_name)
            for number, value in enumerate(values):
                e.value.add(name=value, number=number)
        for field_name, number, kind, type_name, repeated in fields:
            label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".inference.{type_name}"

    S, E, I32, I64, M = F.TYPE_STRING, F.TYPE_ENUM, F.TYPE_INT32, F.TYPE_INT64, F.TYPE_MESSAGE
    formats = [("Format", ["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"])]
    message(
        "ModelInput",
        [("name", 1, S, None, False), ("data_type", 2, E, "DataType", False),
         ("format", 3, E, "ModelInput.Format", False), ("dims", 4, I64, None, True)],
        formats,
    )  # fmt: skip
    message(
        "ModelOutput",
        [("name", 1, S, None, False), ("data_type", 2, E, "DataType", False), ("dims", 3, I64, None, True),
         ("label_filename", 4, S, None, False)],
    )  # fmt: skip
    message("ModelDynamicBatching", [])
    message(
        "ModelConfig",
        [("name", 1, S, None, False), ("platform", 2, S, None, False), ("max_batch_size", 4, I32, None, False),
         ("input", 5, M, "ModelInput", True), ("output", 6, M, "ModelOutput", True),
         ("dynamic_batching", 11, M, "ModelDynamicBatching", False)],
    )  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


@pytest.mark.slow
@pytest.mark.parametrize("softmax", [False, True])
def test_triton_repository(imported, tmp_path, softmax, photos):
    exported = ex.write_triton_repository(imported, tmp_path / "models", max_batch_size=16, softmax=softmax)
    model_dir = tmp_path / "models" / "alexnet"
    assert exported.path == model_dir / "1" / "model.onnx"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]  # fmt: skip
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_class()())
    assert (config.name, config.platform, config.max_batch_size) == ("alexnet", "onnxruntime_onnx", 16)
    assert config.HasField("dynamic_batching")
    # consistent with the model: names, element types, and dims without the (dynamic) batch dimension
    model = onnx.load(str(exported.path))
    for declared, actual in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [d.name for d in declared] == [a.name for a in actual]
        for d, a in zip(declared, actual):
            assert d.data_type == 11 and a.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # TYPE_FP32
            dims = a.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch"
            assert list(d.dims) == [dim.dim_value for dim in dims[1:]]
    assert list(config.input[0].dims) == [3, 227, 227] and list(config.output[0].dims) == [1000]
    assert config.output[0].name == ("probabilities" if softmax else "logits")
    labels = (model_dir / config.output[0].label_filename).read_text().splitlines()
    assert labels == [f"{c.wnid} {c.name}" for c in imported.classes]
    # what Triton would run: a batch of max_batch_size
    x = photo_batch(imported, photos).repeat(2, 1, 1, 1)[:16]
    out = run(ex.onnxruntime_session(exported.path), x)
    assert out.shape == (16, 1000)


def test_triton_repository_with_a_mean_image(own, tmp_path):
    ex.write_triton_repository(own, tmp_path, name="paper", version=3)
    assert (tmp_path / "paper" / "3" / "model.mean_image.npy").is_file()
    text = (tmp_path / "paper" / "config.pbtxt").read_text()
    assert "3/model.mean_image.npy" in text  # the comment says where the mean image is
    assert text_format.Parse(text, model_config_class()()).name == "paper"


# -------------------------------------------------------------------------------------- failures and the CLI


def test_a_failed_write_leaves_no_partial_file(own, tmp_path, monkeypatch):
    out = tmp_path / "alexnet.onnx"
    out.write_bytes(b"the previous export")
    written = []

    def fail(path, checkpoint, batch=2):
        written.append(Path(path).stat().st_size)  # the whole file was written to a temporary …
        raise OSError(28, "No space left on device", str(path))  # … and then something fails

    monkeypatch.setattr(onnx_file, "verify_with_onnxruntime", fail)
    with pytest.raises(OSError):
        ex.export(own, out, verify=True)
    assert written and written[0] > 1_000_000
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alexnet.onnx"]  # no temporary, no mean image
    out.unlink()
    with pytest.raises(OSError):
        ex.export(own, out, verify=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_verify_failure_writes_nothing(own, tmp_path, monkeypatch, capsys):
    """--verify that finds a difference: exit 1, and OUT is not created."""
    real = ex.build_model

    def wrong_lrn(checkpoint, **kwargs):
        config = dataclasses.replace(checkpoint.config, lrn_across_towers=True)
        return real(dataclasses.replace(checkpoint, config=config), **kwargs)

    monkeypatch.setattr(onnx_file, "build_model", wrong_lrn)
    out = tmp_path / "x.onnx"
    assert ex.main([own.path, str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ONNX Runtime's output does not match the net's" in err
    assert err.count("\n") == 1
    assert not out.exists()


def save(checkpoint: Checkpoint, path: Path) -> str:
    checkpoint.save(path)
    return str(path)


@pytest.mark.parametrize(
    "lrn, message",
    [
        (LRNConfig(size=4), "size 4 (ONNX Runtime's LRN takes odd sizes only"),
        (LRNConfig(alpha=0.0), "alpha 0.0 (ONNX Runtime's LRN needs alpha > 0)"),
        (LRNConfig(beta=0.0), "beta 0.0 (ONNX Runtime's LRN needs beta > 0)"),
    ],
)
def test_what_onnx_cannot_express_is_refused(tmp_path, capsys, lrn, message):
    path = save(make_checkpoint(lrn=lrn), tmp_path / "odd.safetensors")
    assert ex.main([path, str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: its LRN cannot be expressed as ONNX's LRN: {message}"), err
    assert err.count("\n") == 1 and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{ck}"], "give either OUT or --triton-repository DIR"),
        (["{ck}", "{tmp}/x.onnx", "--triton-repository", "{tmp}/models"], "give either OUT or --triton-repository"),
        (["{ck}", "{tmp}/x.onnx", "--opset", "8"], "--opset must be between 9 and"),
        (["{ck}", "{tmp}/x.onnx", "--opset", "seventeen"], "argument --opset: invalid int value"),
        (["{ck}", "{ck}"], "is the checkpoint itself"),
        (["{ck}", "{tmp}"], "is a directory"),
        (["{ck}", "{ck}/x.onnx"], "is not a directory"),
        (["{ck}", "--triton-repository", "{tmp}/m", "--triton-name", "../up"], "--triton-name must be a plain"),
        (["{ck}", "--triton-repository", "{tmp}/m", "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["{ck}", "{tmp}/x.onnx", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_arguments_exit_2(own, tmp_path, capsys, argv, message):
    argv = [a.format(ck=own.path, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit:
        ex.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not [p for p in tmp_path.iterdir()]  # nothing written


def test_without_onnx_the_error_says_how_to_install_it(own, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx → ImportError
    assert ex.main([own.path, str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert err == "error: the ONNX export needs the onnx package: pip install -e '.[export]' (or: pip install onnx)\n"


@pytest.mark.slow
def test_the_command(own, tmp_path):
    """`python -m model.export` itself: written and verified (exit 0); a bad checkpoint, exit 1 and one
    line without a traceback (the other exit statuses and messages: main() in-process, above)."""

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "model.export", *map(str, argv)], cwd=REPO,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip

    out = tmp_path / "alexnet.onnx"
    done = cli(own.path, out, "--softmax", "--opset", "13", "--verify")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: AlexNet, 1000 classes" in done.stdout and "opset 13" in done.stdout
    assert "'probabilities'" in done.stdout and "verified with ONNX Runtime" in done.stdout
    assert onnx.load(str(out)).opset_import[0].version == 13

    not_a_checkpoint = tmp_path / "photo.safetensors"
    not_a_checkpoint.write_bytes(b"\x00" * 64)
    failed = cli(not_a_checkpoint, tmp_path / "y.onnx")
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr == f"error: {not_a_checkpoint}: not a safetensors file (its header is not JSON)\n"
    assert not (tmp_path / "y.onnx").exists()
