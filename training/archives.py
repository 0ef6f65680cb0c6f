"""The archive forms, read in place or streamed, never unpacked.

An uncompressed tar (a tar inside a tar too) is indexed from header to header; workers read each image at its offset.
A .tar.gz cannot be sought in: it is read as a stream, once to list it and once to decode it.
"""

from __future__ import annotations

import json
import queue
import tarfile
import threading
from pathlib import Path

from model import imagenet_classes
from model.image_files import is_image_name

from .errors import TrainingError
from .listing import WNID, SplitListing, file_stem, tar_names


def open_tar(path: Path, fileobj=None) -> tarfile.TarFile:
    try:
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except (tarfile.TarError, OSError) as e:
        raise TrainingError(f"{path}: not a readable uncompressed tar ({e})") from None


def tar_images(tar: tarfile.TarFile, archive: Path, base: int, prefix: str, listing: SplitListing, wnid=None):
    """Add every image member of ``tar`` (whose bytes start at ``base`` in ``archive``) to ``listing``."""
    for member in tar:
        if member.isfile() and is_image_name(member.name):
            label = wnid if wnid is not None else file_stem(member.name).split("_")[0]
            listing.add(f"{prefix}/{member.name}", label, ("at", str(archive), base + member.offset_data, member.size))


def per_class_tars(root: Path, folder: Path) -> SplitListing:
    """train/<wnid>.tar, one tar per class (as ILSVRC2012_img_train.tar holds them), read in place."""
    listing = SplitListing(layout="per-class tars")
    for name in tar_names(folder):
        path = folder / name
        with open_tar(path) as tar:
            tar_images(tar, path, 0, path.relative_to(root).as_posix(), listing, wnid=name[: -len(".tar")])
    return listing


def tar_of_tars(root: Path, path: Path) -> SplitListing:
    """ILSVRC2012_img_train.tar: a tar of <wnid>.tar, each a tar of that class's images."""
    listing = SplitListing(layout=f"{path.name}: per-class tars inside a tar")
    with open_tar(path) as outer:
        for member in sorted((m for m in outer if m.isfile() and m.name.endswith(".tar")), key=lambda m: m.name):
            wnid = member.name.rsplit("/", 1)[-1][: -len(".tar")]
            inner = open_tar(path, fileobj=outer.extractfile(member))
            tar_images(inner, path, member.offset_data, f"{path.name}/{member.name}", listing, wnid=wnid)
    if not listing.names:
        raise TrainingError(f"{path}: holds no per-class tars (<wnid>.tar)")
    return listing


def flat_tar(root: Path, path: Path) -> SplitListing:
    listing = SplitListing(layout=f"{path.name}: flat tar")
    with open_tar(path) as tar:
        tar_images(tar, path, 0, path.name, listing, wnid="")
    return listing


def gz_shards(root: Path, shards: list[Path], layout: str) -> SplitListing:
    """Hugging Face's tar.gz shards, streamed: the wnid ends each file name (x_n01440764.JPEG)."""
    from concurrent.futures import ThreadPoolExecutor

    def members(shard: Path) -> list[str]:
        try:
            with tarfile.open(shard, mode="r|gz") as tar:
                return [m.name for m in tar if m.isfile() and is_image_name(m.name)]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise TrainingError(f"{shard}: not a readable .tar.gz ({e})") from None

    listing = SplitListing(layout=layout)
    with ThreadPoolExecutor(min(4, len(shards))) as threads:  # zlib lets go of the GIL: shards in parallel
        for shard, names in zip(shards, threads.map(members, shards)):
            for n, name in enumerate(names):
                wnid = file_stem(name).rsplit("_", 1)[-1]
                if not WNID.fullmatch(wnid):
                    raise TrainingError(f"{shard}: {name} does not end in a wnid (expected e.g. x_n01440764.JPEG)")
                first = file_stem(name).split("_")[0]
                if WNID.fullmatch(first) and first != wnid:  # train names repeat the wnid: both must agree
                    raise TrainingError(
                        f"{shard}: {name} names two classes, {first} (its original name) and {wnid} (its label)"
                    )
                listing.add(f"{shard.relative_to(root).as_posix()}/{name}", wnid, ("gz", str(shard), n))
    return listing


def wds_shards(root: Path, shards: list[Path], layout: str) -> SplitListing:
    """WebDataset shards: samples KEY.<image ext> + KEY.cls or KEY.json, in uncompressed tars."""
    standard = [c.wnid for c in imagenet_classes()]
    listing = SplitListing(layout=layout)
    for shard in shards:
        with open_tar(shard) as tar:
            samples: dict[str, dict] = {}
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                key, _, ext = base.partition(".")
                sample = samples.setdefault(f"{directory}/{key}" if directory else key, {})
                if is_image_name(member.name):
                    sample["image"] = member
                elif ext in ("cls", "json"):
                    sample[ext] = tar.extractfile(member).read().decode("utf-8", "replace")
            for key, sample in samples.items():
                if "image" not in sample:
                    continue
                where = f"{shard}: sample {key}"
                index = _wds_label(sample, where)
                if not 0 <= index < len(standard):
                    raise TrainingError(f"{where}: class index {index} is not one of ImageNet's 0..999")
                wnid = standard[index]
                names = (key.rsplit("/", 1)[-1].split("_")[0], _json_field(sample, "filename")[:9])
                named = [w for w in names if WNID.fullmatch(w or "")]
                if named and named[0] != wnid:
                    raise TrainingError(
                        f"{where}: its name says {named[0]} but its label {index} is {wnid} (ImageNet's standard "
                        "order); the two disagree"
                    )
                member = sample["image"]
                listing.add(f"{shard.name}/{member.name}", wnid, ("at", str(shard), member.offset_data, member.size))
    return listing


def _json_field(sample: dict, name: str) -> str:
    try:
        value = json.loads(sample["json"]).get(name, "") if "json" in sample else ""
    except (ValueError, AttributeError):
        value = ""
    return str(value)


def _wds_label(sample: dict, where: str) -> int:
    text = sample.get("cls") or _json_field(sample, "label")
    if not text.strip().lstrip("-").isdigit():
        raise TrainingError(f'{where}: no class index (expected KEY.cls, or KEY.json with "label")')
    return int(text.strip())


def streamed(locators: list, root: Path):
    """What a worker is given for each locator: a path, an in-place locator, or the bytes of a .tar.gz
    member, streamed in order (a resumed split reads past the members already done)."""
    stream = shard = None
    position = 0  # image members of ``shard`` read so far
    try:
        for locator in locators:
            if locator is None or locator[0] != "gz":
                yield locator
                continue
            _, wanted_shard, n = locator
            if wanted_shard != shard or n < position:
                if stream is not None:
                    stream.close()
                stream, shard, position = tarfile.open(wanted_shard, mode="r|gz"), wanted_shard, 0
            while (member := stream.next()) is not None:  # (iterating the TarFile again would start over)
                if member.isfile() and is_image_name(member.name):
                    position += 1
                    if position - 1 == n:
                        yield stream.extractfile(member).read()
                        break
            else:
                raise TrainingError(f"{shard}: ended before image {n + 1}; it changed since it was listed")
            stream.members.clear()  # a stream keeps every header it read: not 1.28 million of them
    finally:
        if stream is not None:
            stream.close()


def prefetched(items, depth: int):
    """``items`` produced by a thread, up to ``depth`` ahead: gzip inflation lets go of the GIL, so it runs
    beside the main loop."""
    done = object()
    box: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            box.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            box.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
