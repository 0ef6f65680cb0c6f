"""How fast ``python -m training prepare`` can go, and which side sets the pace: the decoding workers or
the main process. Both measured on real photos, for the code as shipped (--baseline, a git revision) and
as it is now, in one command; both projected to 16 cores.

    .venv/bin/python bench/prepare_throughput.py --photos /work/imagenette --images 400 --main-images 3000 \
        --e2e-images 2000 --workers 2

1. Workers: one process, one torch thread (as each pool worker runs), decodes --images photos of
   PHOTOS/train the way a worker does for the train split (statistics included): CPU img/s per core. The
   Imagenette copy holds 224×224 photos, smaller than ImageNet's (~400×350 on average, 110 KB), so the
   same is measured on the ten full-size ImageNet photos of tests/fixtures/images, each decoded
   --images / 10 times; the projection uses the slower of the two.
2. Main process: the real ``prepare`` over a folder of --main-images links to those photos, with a pool
   that answers at once with real decoded results (pickled, as a worker's answer is, and unpickled in the
   main process): nothing but the main loop's work (unpickling, appending, statistics, progress, fsync),
   on a raw store in a temporary directory. Each version runs in its own process with the environment the
   command gives it (as shipped: none; now: OMP_WAIT_POLICY=PASSIVE, which ``prepare`` sets).
3. End to end: the real ``prepare`` with --workers processes over the same kind of folder (--e2e-images
   train images): wall img/s, and CPU seconds per image of the main process (all its threads: the pool's
   result handler unpickling, appends, fsync) and of the workers. 1 ÷ the main process's CPU per image is
   a second, stricter figure for its ceiling (it includes receiving the results through the pipes); the
   projection uses the lower of the two.
Projection to 16 cores: min(16 × the per-core worker rate, the main process's ceiling), and the time for
ImageNet's 1,281,167 train images at that rate (the disk permitting).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import types
from itertools import cycle
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGENET_TRAIN = 1_281_167
CORES = 16
BASELINE = "bc691fe"  # the last commit before prepare read other forms and moved work off the main loop


def photo_paths(photos: Path, count: int) -> list[Path]:
    """``count`` photos of PHOTOS/train, taken from each class folder in turn."""
    folders = [sorted(d.iterdir()) for d in sorted((photos / "train").iterdir()) if d.is_dir()]
    picked = []
    for row in zip(*folders):
        picked += row
    if len(picked) < count:
        raise SystemExit(f"{photos}/train has {len(picked)} photos in whole rows of classes; asked for {count}")
    return picked[:count]


def load_version(version: str):
    """training.prepare as it is now ("current"), or as it was at a git revision."""
    if version == "current":
        import training.prepare
        import training.prepare_split

        split = training.prepare_split
        return types.SimpleNamespace(prepare=training.prepare.prepare, _decode_task=split._decode_task, _decode=split._decode)
    # The whole package as it was, under another name: its modules have moved since.
    folder = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", version, "training"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "training").rename(folder / "training_shipped")
    sys.path.insert(0, str(folder))
    return importlib.import_module("training_shipped.prepare")


def worker_rate(module, paths: list[Path]) -> float:
    """img/s of one core decoding as a pool worker does for the train split."""
    import torch

    torch.set_num_threads(1)
    tasks = [(str(p), True, None) for p in paths]
    started = time.process_time()
    if hasattr(module, "_decode_task"):
        per = module.TASK_IMAGES
        for i in range(0, len(tasks), per):
            module._decode_task((None, tasks[i : i + per]))
    else:
        for task in tasks:
            module._decode(task)
    return len(tasks) / (time.process_time() - started)


class _Answered:
    def __init__(self, answer):
        self.answer = answer

    def get(self):
        return self.answer


class InstantPool:
    """Answers every task with real decoded results at once: only the main process's work is left."""

    def __init__(self, module, paths: list[Path]):
        tasks = [(str(p), True, None) for p in paths]
        if hasattr(module, "_decode_task"):
            per = module.TASK_IMAGES
            blobs = [pickle.dumps(module._decode_task((None, tasks[i : i + per]))) for i in range(0, len(tasks), per)]
        else:
            blobs = [pickle.dumps(module._decode(t)) for t in tasks]
        self.answers = cycle(blobs)

    def apply_async(self, fn, args):  # now: a job is (slot, a few images); unpickled here, as a pool's answer is
        ((_, task),) = args
        results, sums = pickle.loads(next(self.answers))
        return _Answered((results[: len(task)], sums if task[0][1] else None))

    def imap(self, fn, tasks, chunksize=1):  # as shipped: one answer per image
        for task in tasks:
            answer = pickle.loads(next(self.answers))
            yield answer if task[1] else (answer[0], None, None, None)

    def terminate(self):
        pass

    def join(self):
        pass


def main_ceiling(version: str, photos: Path, count: int, sample: int) -> dict:
    """img/s of the real ``prepare`` (train split + a small val split) when the workers answer at once."""
    module = load_version(version)
    paths = photo_paths(photos, sample)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for split, n in (("train", count), ("val", max(20, count // 50))):
            for i, path in enumerate(photo_paths(photos, n)):
                (src / split / path.parent.name).mkdir(parents=True, exist_ok=True)
                os.symlink(path, src / split / path.parent.name / f"{i}_{path.name}")
        pool = InstantPool(module, paths)
        module._pool = lambda workers: pool
        started = time.perf_counter()
        module.prepare(src, Path(tmp) / "out", workers=1, show_progress=True)
        seconds = time.perf_counter() - started
        images = count + max(20, count // 50)
    return {"images": images, "seconds": round(seconds, 2), "img_s": round(images / seconds, 1)}


def end_to_end(version: str, photos: Path, count: int, workers: int) -> dict:
    """The real ``prepare`` with a real pool: wall img/s and CPU per image, main process and workers."""
    import resource

    module = load_version(version)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        val = max(20, count // 50)
        for split, n in (("train", count), ("val", val)):
            for i, path in enumerate(photo_paths(photos, n)):
                (src / split / path.parent.name).mkdir(parents=True, exist_ok=True)
                os.symlink(path, src / split / path.parent.name / f"{i}_{path.name}")
        main_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        module.prepare(src, Path(tmp) / "out", workers=workers, show_progress=True)
        seconds = time.perf_counter() - started
        main_after = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's workers, reaped by join()
    images = count + val
    main_cpu = (main_after.ru_utime + main_after.ru_stime) - (main_before.ru_utime + main_before.ru_stime)
    return {
        "images": images,
        "img_s": round(images / seconds, 1),
        "main_cpu_ms_per_image": round(1000 * main_cpu / images, 3),
        "worker_cpu_ms_per_image": round(1000 * (children.ru_utime + children.ru_stime) / images, 3),
        "main_ceiling_img_s": round(images / main_cpu, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=Path("/work/imagenette"), help="an ImageNet-layout folder")
    parser.add_argument("--images", type=int, default=400, help="photos each worker measurement decodes")
    parser.add_argument("--main-images", type=int, default=3000, help="train images of the main-process run")
    parser.add_argument("--sample", type=int, default=64, help="distinct decoded answers the instant pool cycles")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the code as shipped")
    parser.add_argument("--e2e-images", type=int, default=2000, help="train images of the end-to-end run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of the end-to-end run")
    parser.add_argument("--main-ceiling", choices=("current", "shipped"), help=argparse.SUPPRESS)
    parser.add_argument("--e2e", choices=("current", "shipped"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.main_ceiling or args.e2e:  # a child process of step 2 or 3
        which = args.main_ceiling or args.e2e
        version = "current" if which == "current" else args.baseline
        if args.main_ceiling:
            print(json.dumps(main_ceiling(version, args.photos, args.main_images, args.sample)))
        else:
            print(json.dumps(end_to_end(version, args.photos, args.e2e_images, args.workers)))
        return

    paths = photo_paths(args.photos, args.images)
    full_size = sorted((REPO / "tests" / "fixtures" / "images").glob("*.JPEG")) * max(1, args.images // 10)
    results = {}
    for name, version in (("shipped", args.baseline), ("current", "current")):
        module = load_version(version)
        worker_rate(module, paths[:16])  # warm the page cache and the code
        small, full = worker_rate(module, paths), worker_rate(module, full_size)
        per_core = min(small, full)
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if name == "current":
            env["OMP_WAIT_POLICY"] = "PASSIVE"  # what `python -m training prepare` sets before torch loads
        common = ["--photos", str(args.photos), "--main-images", str(args.main_images), "--sample", str(args.sample),
                  "--baseline", args.baseline, "--e2e-images", str(args.e2e_images), "--workers", str(args.workers)]
        figures = []
        for step in ("--main-ceiling", "--e2e"):
            child = subprocess.run([sys.executable, __file__, step, name, *common], env=env, capture_output=True,
                                   text=True)  # fmt: skip
            if child.returncode:
                raise SystemExit(f"{name} {step}: failed:\n{child.stderr[-2000:]}")
            figures.append(json.loads(child.stdout.strip().splitlines()[-1]))
        ceiling, e2e = figures
        ceiling = {"img_s": min(ceiling["img_s"], e2e["main_ceiling_img_s"]), "instant_pool": ceiling["img_s"]}
        pace = min(CORES * per_core, ceiling["img_s"])
        results[name] = {
            "worker_img_s_per_core_224px": round(small, 1),
            "worker_img_s_per_core_full_size": round(full, 1),
            "worker_img_s_per_core": round(per_core, 1),
            "main_ceiling_instant_pool_img_s": ceiling["instant_pool"],
            "e2e_img_s": e2e["img_s"],
            "e2e_main_cpu_ms_per_image": e2e["main_cpu_ms_per_image"],
            "e2e_worker_cpu_ms_per_image": e2e["worker_cpu_ms_per_image"],
            "main_ceiling_img_s": ceiling["img_s"],
            f"projected_img_s_{CORES}_cores": round(pace, 1),
            "bound_by": "workers" if CORES * per_core <= ceiling["img_s"] else "main process",
            "imagenet_train_minutes": round(IMAGENET_TRAIN / pace / 60, 1),
        }
    for name, figures in results.items():
        print(f"{name}:\n" + "".join(f"  {k:36} {v}\n" for k, v in figures.items()), end="")
    shipped, current = results["shipped"], results["current"]
    projected = f"projected_img_s_{CORES}_cores"
    print(
        f"ratio now ÷ shipped: main ceiling ×{current['main_ceiling_img_s'] / shipped['main_ceiling_img_s']:.2f}, "
        f"worker per core ×{current['worker_img_s_per_core'] / shipped['worker_img_s_per_core']:.2f}, "
        f"projected {CORES}-core rate ×{current[projected] / shipped[projected]:.2f}"
    )


if __name__ == "__main__":
    main()
