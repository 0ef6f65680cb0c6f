"""The engine: the towers on their devices answer as the grouped net, batches larger than max_batch are
split, the untrained net is the same on every start, and each kind of bad image has its status."""

from __future__ import annotations

import pytest
import torch
from support.service import write_checkpoint

from model import load_checkpoint
from service import engine
from service.problems import image_problem


def test_each_kind_of_bad_image_has_its_status():
    """The model says what is wrong with an image (its error's class); the service says what HTTP answers it."""
    from model import CorruptImage, ImageError, ImageTooLarge, UnsupportedImage

    for error, status, slug in (
        (ImageTooLarge("too many pixels"), 413, "image-too-large"),
        (UnsupportedImage("not an image"), 415, "unsupported-image"),
        (CorruptImage("truncated"), 422, "invalid-image"),
        (ImageError("something else"), 422, "invalid-image"),
    ):
        problem = image_problem(error, "file 2 ('a.png')")
        assert (problem.status, problem.slug) == (status, slug)
        assert problem.detail == f"file 2 ('a.png'): {error}"
    assert not hasattr(ImageError, "status"), "model knows nothing of HTTP"



@pytest.mark.slow
def test_two_towers_answer_like_the_grouped_net(tmp_path, photos):
    """ALEXNET_DEVICE=cuda:0,cuda:1 runs the paper's two towers; on CPU ("cpu,cpu") the same code path.
    A single CPU device runs CPUInferenceNet (the net laid out for oneDNN); a single GPU runs the grouped
    net. Whatever the form, the answers are the grouped net's."""
    path = write_checkpoint(tmp_path / "c.safetensors", seed=5, width=0.0625)
    cpu = torch.device("cpu")
    single, towers = engine.load(path, (cpu,)), engine.load(path, (cpu, cpu))
    assert type(single.net).__name__ == "CPUInferenceNet" and type(towers.net).__name__ == "AlexNet"
    assert not single.net.training and not towers.net.training
    checkpoint = load_checkpoint(path)
    grouped, preprocessor = checkpoint.build_grouped().eval(), checkpoint.preprocessor()
    images = [single.preprocessor.load(p.read_bytes()) for p in photos[:3]]
    for crops in ("center", "ten"):
        with torch.no_grad():
            x = preprocessor.from_uint8(torch.stack(images), crops)
            a = grouped(x.flatten(0, 1)).softmax(1).view(3, 10, -1).mean(1) if crops == "ten" else grouped(x).softmax(1)
        (b,), (c,) = towers.predict([images], [crops], 4), single.predict([images], [crops], 4)
        assert a.shape == (3, 1000) and torch.allclose(a.sum(1), torch.ones(3))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    assert single.identity.sha256 == towers.identity.sha256 and single.identity.trained



@pytest.mark.slow
def test_predict_splits_batches_larger_than_max_batch(tmp_path, photos):
    """One request may hold more network inputs than max_batch (16 ten-crop images): run in chunks."""
    model = engine.load(write_checkpoint(tmp_path / "c.safetensors", seed=6, width=0.0625), (torch.device("cpu"),))
    images = [model.preprocessor.load(p.read_bytes()) for p in photos[:3]]
    (chunked,), (whole,) = model.predict([images], ["ten"], 7), model.predict([images], ["ten"], 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)
    # Requests of both kinds in one batch: each gets what it would get alone.
    mixed = model.predict([images[:1], images[1:], images[:2]], ["center", "ten", "center"], 16)
    alone = [
        model.predict([r], [c], 16)[0] for r, c in ((images[:1], "center"), (images[1:], "ten"), (images[:2], "center"))
    ]
    for a, b in zip(mixed, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)



@pytest.mark.slow
def test_the_untrained_net_is_the_same_on_every_start(monkeypatch, photos):
    """Without a checkpoint the net is initialised from engine.UNTRAINED_SEED: two builds have the same
    weights and answer a photo alike, and building one leaves the process's random state alone."""
    built = []
    real = engine.from_checkpoint
    monkeypatch.setattr(engine, "from_checkpoint", lambda ck, *a, **k: built.append(ck) or real(ck, *a, **k))
    cpu = (torch.device("cpu"),)
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = engine.untrained(cpu)
    assert torch.equal(torch.random.get_rng_state(), state)  # not reseeded, nothing drawn from it
    second = engine.untrained(cpu)
    a, b = (ck.state_dict for ck in built)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.metadata["provenance"]["init_seed"] == engine.UNTRAINED_SEED and not first.identity.trained
    tabby = next(p for p in photos if "tabby" in p.name)
    image = first.preprocessor.load(tabby.read_bytes())
    (p1,), (p2,) = first.predict([[image]], ["center"], 1), second.predict([[image]], ["center"], 1)
    assert torch.equal(p1, p2)
    assert torch.equal(p1.topk(5).indices, p2.topk(5).indices)
    # Another seed would give other weights: the seed, not a coincidence, makes the builds agree.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(engine.UNTRAINED_SEED + 1)
        other = engine.GroupedAlexNet(engine.AlexNetConfig()).state_dict()
    assert not torch.equal(other["conv1.weight"], a["conv1.weight"])
