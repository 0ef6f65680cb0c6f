"""``python -m training predict``: a folder or files → top-k per file (JSON lines or CSV), resumable, with
ground truth scored and hidden features written; checked against the net's own outputs."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.service import write_checkpoint

import predict.run as predict_run
from model import load_checkpoint
from training.__main__ import main

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "tests" / "fixtures" / "images"
PHOTOS = sorted(IMAGES.glob("*.JPEG"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("predict") / "small.safetensors", seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The net's own answers for the photos: {name: (probabilities, ten-crop probabilities, fc6, fc7)}."""
    ck = load_checkpoint(checkpoint)
    net, pre = ck.build_grouped("cpu").eval(), ck.preprocessor()
    out = {}
    with torch.no_grad():
        for photo in PHOTOS:
            data = photo.read_bytes()
            x = pre.from_bytes(data)
            ten = pre.from_bytes(data, "ten").flatten(0, 1)
            out[photo.name] = (
                net(x).softmax(dim=1)[0],
                net(ten).softmax(dim=1).mean(dim=0),
                net.features(x, "fc6")[0],
                net.features(x, "fc7")[0],
            )
    return out, ck.classes


def photos_folder(root: Path, corrupt: bool = True) -> Path:
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, photo in enumerate(PHOTOS):
        shutil.copy(photo, folder / ("sub" if i % 3 == 0 else "") / photo.name)
    if corrupt:
        (folder / "sub" / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:2000])  # a truncated JPEG
        (folder / "notes.png").write_bytes(b"this is not a picture")
        (folder / "readme.txt").write_text("not an image extension: not listed")
    return folder


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["predict", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_name(recs: list[dict]) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in recs}


def assert_same_records(a: Path, b: Path) -> None:
    """The same files, errors and classes; scores equal to float tolerance (a file classified in a batch
    of another size goes through other oneDNN kernels: the last bits of its scores differ)."""
    a_records, b_records = (records(p) if p.suffix == ".jsonl" else list(csv.DictReader(p.open())) for p in (a, b))
    assert len(a_records) == len(b_records)
    for x, y in zip(a_records, b_records):
        assert {k: v for k, v in x.items() if "score" not in k and k != "predictions"} == {
            k: v for k, v in y.items() if "score" not in k and k != "predictions"
        }
        for key in x:
            if "score" in key and (x[key] or y[key]):
                assert math.isclose(float(x[key]), float(y[key]), rel_tol=5e-4, abs_tol=1e-6)
        for p, q in zip(x.get("predictions", ()), y.get("predictions", ()), strict=True):
            assert {**p, "score": 0} == {**q, "score": 0}
            assert math.isclose(p["score"], q["score"], rel_tol=5e-4, abs_tol=1e-6)


def assert_top_k(record: dict, probabilities: torch.Tensor, classes, k: int = 5) -> None:
    scores, indices = probabilities.topk(k)
    predictions = record["predictions"]
    assert [p["rank"] for p in predictions] == list(range(1, k + 1))
    assert [p["index"] for p in predictions] == indices.tolist()
    assert [p["wnid"] for p in predictions] == [classes[i].wnid for i in indices.tolist()]
    assert [p["label"] for p in predictions] == [classes[i].label for i in indices.tolist()]
    for p, score in zip(predictions, scores.tolist()):  # (CPUInferenceNet sums in another order: ~1e-4 relative)
        assert math.isclose(p["score"], score, rel_tol=5e-4, abs_tol=1e-6), (p, score)


@pytest.mark.slow
def test_a_folder_is_classified_as_the_net_does_and_bad_files_get_an_error(tmp_path, capsys, checkpoint, reference):
    expected, classes = reference
    folder = photos_folder(tmp_path)
    out = tmp_path / "out.jsonl"
    code, stdout, _ = run(capsys, checkpoint, folder, "--output", out, "--workers", 0)
    assert code == 0
    recs = by_name(records(out))
    assert set(recs) == {p.name for p in PHOTOS} | {"broken.jpg", "notes.png"}  # recursive; .txt not listed
    for photo in PHOTOS:
        assert "error" not in recs[photo.name]
        assert_top_k(recs[photo.name], expected[photo.name][0], classes)
    assert recs["broken.jpg"]["error"].startswith("CorruptImage: ") and "predictions" not in recs["broken.jpg"]
    assert recs["notes.png"]["error"].startswith("UnsupportedImage: not an image")
    assert recs[PHOTOS[0].name]["path"] == str(folder / "sub" / PHOTOS[0].name)  # SOURCE joined with the path
    assert "12 files: 10 classified, 2 unreadable" in stdout
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["complete"] and summary["files"] == 12 and summary["top1_error"] is None


@pytest.mark.slow
def test_files_lists_top_k_and_too_large_images(tmp_path, capsys, checkpoint, reference):
    expected, classes = reference
    listing = tmp_path / "list.txt"
    listing.write_text(f"{PHOTOS[1]}\n\n{tmp_path / 'missing.jpg'}\n{PHOTOS[2]}\n")
    out = tmp_path / "out.jsonl"
    code, *_ = run(capsys, checkpoint, PHOTOS[3], "--files-from", listing, "--output", out, "--top-k", 3,
                   "--workers", 0, "--max-pixels", 200_000)  # fmt: skip
    assert code == 0
    recs = records(out)
    assert [Path(r["path"]).name for r in recs] == [PHOTOS[3].name, PHOTOS[1].name, "missing.jpg", PHOTOS[2].name]
    assert recs[2]["error"] == "cannot read: No such file or directory"
    for r in recs:
        if "error" not in r:
            if "ImageTooLarge" not in r.get("error", ""):
                assert_top_k(r, expected[Path(r["path"]).name][0], classes, k=3)
    too_large = run(capsys, checkpoint, PHOTOS[6], "--output", tmp_path / "big.jsonl", "--max-pixels", 1000)
    assert too_large[0] == 0
    assert records(tmp_path / "big.jsonl")[0]["error"].startswith("ImageTooLarge: image is ")


@pytest.mark.slow
def test_workers_in_processes_give_the_same_file_as_inline(tmp_path, capsys, checkpoint):
    folder = photos_folder(tmp_path)
    for workers in (0, 2):
        assert run(capsys, checkpoint, folder, "--output", tmp_path / f"w{workers}.jsonl", "--workers", workers,
                   "--batch-size", 4)[0] == 0  # fmt: skip
    assert (tmp_path / "w0.jsonl").read_bytes() == (tmp_path / "w2.jsonl").read_bytes()


def test_a_rerun_skips_the_files_done_and_drops_an_unfinished_last_line(tmp_path, capsys, checkpoint):
    folder = photos_folder(tmp_path)
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert run(capsys, checkpoint, folder, "--output", full, "--workers", 0)[0] == 0
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:37])  # a run killed while writing its 5th line
    code, _, err = run(capsys, checkpoint, folder, "--output", out, "--workers", 0)
    assert code == 0 and "dropped an unfinished last line" in err and "4 files already done, 8 to go" in err
    assert_same_records(out, full)
    assert json.loads(Path(f"{out}.summary.json").read_text())["this_run"]["files"] == 8
    code, stdout, err = run(capsys, checkpoint, folder, "--output", out, "--workers", 0)  # nothing left to do
    assert code == 0 and "12 files already done, 0 to go" in err
    assert_same_records(out, full)
    # another checkpoint or other options would mix two runs' predictions in one file: refused
    code, _, err = run(capsys, checkpoint, folder, "--output", out, "--crops", "ten")
    assert code == 2 and err.startswith("error: ") and "crops: 'center' then, 'ten' now" in err


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_rerun_continues(tmp_path, capsys, checkpoint, monkeypatch):
    folder = photos_folder(tmp_path, corrupt=False)
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert run(capsys, checkpoint, folder, "--output", full, "--workers", 0, "--batch-size", 3)[0] == 0
    classify, calls = predict_run._classify, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return classify(*args)

    monkeypatch.setattr(predict_run, "_classify", interrupted)
    code, _, err = run(capsys, checkpoint, folder, "--output", out, "--workers", 2, "--batch-size", 3)
    assert code == 130 and "rerunning the same command continues where this one stopped" in err
    assert len(records(out)) == 3
    monkeypatch.setattr(predict_run, "_classify", classify)
    assert run(capsys, checkpoint, folder, "--output", out, "--workers", 2, "--batch-size", 3)[0] == 0
    assert_same_records(out, full)


@pytest.mark.slow
def test_an_imagenet_layout_folder_is_scored(tmp_path, capsys, checkpoint, reference):
    """Each photo is filed under a wnid chosen from the net's own ranking, so the expected errors are known."""
    expected, classes = reference
    root = tmp_path / "val"
    wrong1 = wrong5 = 0
    for i, photo in enumerate(PHOTOS):
        ranking = expected[photo.name][0].argsort(descending=True).tolist()
        rank = (0, 0, 0, 2, 4, 5, 20, 0, 1, 999)[i]  # rank 0: top-1 right; 1-4: top-5 right; 5+: both wrong
        wrong1, wrong5 = wrong1 + (rank > 0), wrong5 + (rank > 4)
        folder = root / classes[ranking[rank]].wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "val.jsonl"
    code, stdout, _ = run(capsys, checkpoint, root, "--output", out, "--top-k", 1)
    assert code == 0
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["labels"] == "folders" and summary["labelled"] == 10 and summary["labelled_unreadable"] == 1
    assert summary["top1_error"] == pytest.approx(wrong1 / 10) and summary["top5_error"] == pytest.approx(wrong5 / 10)
    assert f"top-1 error {wrong1 / 10:.2%}  top-5 error {wrong5 / 10:.2%}  over 10 labelled images" in stdout
    assert "1 labelled files unreadable, not counted" in stdout
    recs = by_name(records(out))
    assert len(recs[PHOTOS[0].name]["predictions"]) == 1  # --top-k 1; top-5 is scored all the same
    assert recs[PHOTOS[3].name]["top1_correct"] is False and recs[PHOTOS[3].name]["top5_correct"] is True
    assert recs["broken.jpeg"]["truth"] and "error" in recs["broken.jpeg"]
    # a folder whose subfolders are not the checkpoint's wnids is not scored
    assert run(capsys, checkpoint, photos_folder(tmp_path), "--output", tmp_path / "plain.jsonl")[0] == 0
    assert json.loads((tmp_path / "plain.jsonl.summary.json").read_text())["labels"] is None


@pytest.mark.slow
def test_a_ground_truth_file_is_scored_and_csv_has_the_same_content(tmp_path, capsys, checkpoint, reference):
    expected, classes = reference
    folder = photos_folder(tmp_path)
    lines, wrong1, wrong5, labelled = ["# Caffe's val.txt format, or wnids"], 0, 0, 0
    for i, photo in enumerate(PHOTOS[:8]):
        ranking = expected[photo.name][0].argsort(descending=True).tolist()
        rank = (0, 1, 7, 0, 3, 0, 0, 50)[i]
        wrong1, wrong5, labelled = wrong1 + (rank > 0), wrong5 + (rank > 4), labelled + 1
        label = ranking[rank]
        name = f"sub/{photo.name}" if i % 3 == 0 else photo.name  # a path inside SOURCE, or a name
        lines.append(f"{name} {label}" if i % 2 else f"{name} {classes[label].wnid}")
    lines.append("broken.jpg 7")
    truth = tmp_path / "val.txt"
    truth.write_text("\n".join(lines) + "\n")
    out_json, out_csv = tmp_path / "out.jsonl", tmp_path / "out.csv"
    for out in (out_json, out_csv):
        code, stdout, _ = run(capsys, checkpoint, folder, "--output", out, "--ground-truth", truth)
        assert code == 0
        summary = json.loads(Path(f"{out}.summary.json").read_text())
        assert summary["format"] == out.suffix[1:]
        assert (summary["labelled"], summary["labelled_unreadable"]) == (labelled, 1)
        assert summary["top1_error"] == pytest.approx(wrong1 / labelled)
        assert summary["top5_error"] == pytest.approx(wrong5 / labelled)
    rows = list(csv.DictReader(out_csv.open(newline="")))
    assert list(rows[0])[:5] == ["path", "error", "truth", "top1_correct", "top5_correct"]
    assert list(rows[0])[5:8] == ["wnid_1", "label_1", "score_1"] and len(rows[0]) == 5 + 3 * 5
    for row, record in zip(rows, records(out_json), strict=True):
        assert row["path"] == record["path"] and row["error"] == record.get("error", "")
        assert row["truth"] == record.get("truth", "")
        if "predictions" in record:
            assert row["top1_correct"] == str(int(record["top1_correct"])) if "truth" in record else True
            for p in record["predictions"]:
                assert row[f"wnid_{p['rank']}"] == p["wnid"] and row[f"label_{p['rank']}"] == p["label"]
                assert float(row[f"score_{p['rank']}"]) == p["score"]
    # a CSV resumes too, its unfinished last row dropped
    whole = tmp_path / "whole.csv"
    shutil.copy(out_csv, whole)
    text = out_csv.read_text()
    out_csv.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 30])
    code, _, err = run(capsys, checkpoint, folder, "--output", out_csv, "--ground-truth", truth)
    assert code == 0 and "dropped an unfinished last line" in err
    assert_same_records(out_csv, whole)
    # ground truth that matches no file, or names an unknown class, is bad input
    (tmp_path / "other.txt").write_text("elsewhere.jpg 3\n")
    assert run(capsys, checkpoint, folder, "--output", tmp_path / "x.jsonl", "--ground-truth",
               tmp_path / "other.txt")[0] == 2  # fmt: skip
    (tmp_path / "bad.txt").write_text(f"{PHOTOS[0].name} n99999999\n")
    code, _, err = run(capsys, checkpoint, folder, "--output", tmp_path / "y.jsonl", "--ground-truth",
                       tmp_path / "bad.txt")  # fmt: skip
    assert code == 2 and "line 1: 'n99999999' is neither a class index" in err


@pytest.mark.slow
def test_ten_crops_average_the_softmax_over_the_paper_patches(tmp_path, capsys, checkpoint, reference):
    expected, classes = reference
    out = tmp_path / "ten.jsonl"
    assert run(capsys, checkpoint, IMAGES, "--output", out, "--crops", "ten", "--batch-size", 4, "--workers", 0)[0] == 0
    recs = by_name(records(out))
    for photo in PHOTOS:
        assert_top_k(recs[photo.name], expected[photo.name][1], classes)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["fc7", "fc6"])
def test_features_are_the_nets_hidden_activations(tmp_path, capsys, checkpoint, reference, layer):
    expected, classes = reference
    folder = photos_folder(tmp_path)
    out, npy = tmp_path / "out.jsonl", tmp_path / "features.npy"
    out.write_text('{"path": "left over"}\n')
    code, _, err = run(capsys, checkpoint, folder, "--output", out, "--features", npy, "--layer", layer,
                       "--batch-size", 4)  # fmt: skip
    assert code == 0 and "replaced — a run with --features starts afresh" in err
    files = Path(f"{npy}.files.txt").read_text().splitlines()
    recs = records(out)
    assert files == [r["path"] for r in recs if "error" not in r] and len(files) == 10  # readable ones, in order
    array = np.load(npy)
    assert array.dtype == np.float32 and array.shape == (10, 512)  # 4096 × width 0.125
    column = 2 if layer == "fc6" else 3
    for row, path in zip(array, files):
        want = expected[Path(path).name][column]
        assert torch.allclose(torch.from_numpy(row), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    for record in recs:  # predictions computed from these features equal the net's own
        if "error" not in record:
            assert_top_k(record, expected[Path(record["path"]).name][0], classes)
    code, *_ = run(capsys, checkpoint, folder, "--output", out, "--features", npy, "--layer", layer, "--normalize")
    assert code == 0
    normalized = np.load(npy)
    assert np.allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    assert np.allclose(normalized, array / np.linalg.norm(array, axis=1, keepdims=True), atol=1e-5)


def test_bad_input_is_one_error_line_and_exit_2_a_bad_checkpoint_exit_1(tmp_path, capsys, checkpoint):
    out = tmp_path / "out.jsonl"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    cases = [
        ([checkpoint, tmp_path / "nowhere", "--output", out], "no such file or folder"),
        ([checkpoint, tmp_path / "empty", "--output", out], "no images in this folder"),
        ([checkpoint, IMAGES, "--output", out, "--top-k", 0], "--top-k, --batch-size"),
        ([checkpoint, IMAGES, "--output", out, "--batch-size", 0], "--top-k, --batch-size"),
        ([checkpoint, IMAGES, "--output", out, "--workers", -1], "--workers at least 0"),
        ([checkpoint, IMAGES, "--output", out, "--normalize"], "only with --features"),
        ([checkpoint, IMAGES, "--output", out, "--device", "cuda:7"], "--device cuda:7"),
        ([checkpoint, IMAGES, "--output", out, "--device", "potato"], "--device potato"),
        ([checkpoint, "--output", out], "needs a SOURCE"),
        ([checkpoint, IMAGES, "--output", tmp_path], "is a folder"),
        ([checkpoint, "--files-from", tmp_path / "none.txt", "--output", out], "cannot read"),
    ]
    for args, message in cases:
        code, stdout, err = run(capsys, *args)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors: usage and exit status 2
        main(["predict", str(checkpoint), str(IMAGES), "--output", str(out), "--crops", "five"])
    assert exit_.value.code == 2
    capsys.readouterr()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"<html>not a checkpoint</html>")
    code, _, err = run(capsys, bad, IMAGES, "--output", out)
    assert code == 1 and err.startswith(f"error: {bad}: ") and err.count("\n") == 1


@pytest.mark.slow
def test_the_command_line_as_users_run_it(tmp_path, checkpoint):
    """``python -m training predict`` in a subprocess (it re-runs itself with OMP_WAIT_POLICY=PASSIVE)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    command = [sys.executable, "-m", "training", "predict", str(checkpoint)]
    out = tmp_path / "out.csv"
    result = subprocess.run([*command, str(PHOTOS[0]), str(tmp_path / "nowhere.jpg"), "--output", str(out)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: ") and not out.exists()
    result = subprocess.run([*command, str(PHOTOS[0]), "--output", str(out), "--top-k", "2"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 files: 1 classified, 0 unreadable" in result.stdout and "predict: 1/1" in result.stderr
    assert out.read_text().splitlines()[0] == "path,error,wnid_1,label_1,score_1,wnid_2,label_2,score_2"
