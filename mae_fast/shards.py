"""Tar shards for clusters: an image folder written as webdataset-style tar files, streamed back.

    mae-fast shards --data /data/imagenet/train --out /shared/imagenet-shards --shard-size 1000
    mae-fast pretrain --data-path /shared/imagenet-shards ...      (or python -m mae_fast.shards ...)

Each shard ``shard-000000.tar`` holds, per image, ``<key>.<ext>`` (the file's bytes, not re-encoded)
and ``<key>.cls`` (the class index as text): the layout ``webdataset`` reads (``wds.WebDataset(urls)
.decode("pil")``), so the shards serve other tools too. ``shards.json`` beside them lists the shards
and their image counts, which lets every rank know the epoch's length without opening a tar.

Reading (:class:`TarShards`, no dependency beyond the standard library): one shard list, shuffled
each epoch from (seed, epoch); rank r takes every world-th shard, each DataLoader worker every
num_workers-th of those; each worker streams its shards sequentially (large sequential reads: what
network file systems and object stores serve well) through a shuffle buffer. Every rank yields
exactly ``total // world`` samples per epoch (a worker whose shards run out starts them over), so
DDP ranks take the same number of steps.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import sys
import tarfile
import warnings

import torch

from . import data as data_mod

INDEX = "shards.json"
SHUFFLE_BUFFER = 1000


def is_shards(path: str) -> bool:
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX))) or path.endswith(".tar") \
        or ("*" in path and path.rstrip("*").endswith((".tar", "-")))


def write_shards(src: str, out: str, shard_size: int = 1000, *, say=print) -> dict:
    """Write the images under ``src`` (an image folder) into ``out/shard-%06d.tar`` of
    ``shard_size`` images each, in sorted order, and ``out/shards.json``. Returns the index."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    paths, labels, classes = data_mod.find_images(src)
    os.makedirs(out, exist_ok=True)
    shards = []
    for start in range(0, len(paths), shard_size):
        name = f"shard-{len(shards):06d}.tar"
        tmp = os.path.join(out, name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for k in range(start, min(start + shard_size, len(paths))):
                key = f"{k:09d}"
                ext = os.path.splitext(paths[k])[1].lower().lstrip(".")
                for member, payload in ((f"{key}.{ext}", _read(paths[k])), (f"{key}.cls", str(labels[k]).encode())):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        os.replace(tmp, os.path.join(out, name))
        shards.append({"name": name, "count": min(shard_size, len(paths) - start)})
    index = {"format": "mae_fast-shards-1", "source": os.path.abspath(src), "count": len(paths),
             "classes": classes, "shards": shards}
    with open(os.path.join(out, INDEX), "w") as f:
        json.dump(index, f, indent=1)
    say(f"wrote {len(paths)} images into {len(shards)} shards under {out}")
    return index


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _shard_list(path: str) -> list[tuple[str, int | None]]:
    if os.path.isdir(path):
        with open(os.path.join(path, INDEX)) as f:
            index = json.load(f)
        return [(os.path.join(path, s["name"]), int(s["count"])) for s in index["shards"]]
    found = sorted(glob.glob(path)) if "*" in path else [path]
    if not found:
        raise FileNotFoundError(f"no shards match {path!r}")
    return [(p, None) for p in found]


def _count(path: str) -> int:
    with tarfile.open(path) as tar:
        return sum(1 for m in tar if m.isfile() and not m.name.endswith(".cls"))


class TarShards(torch.utils.data.IterableDataset):
    """The samples of tar shards, transformed; see the module docstring for the split and the
    order. ``set_epoch`` (called by the training loop) reseeds the shard order and the buffer."""

    def __init__(self, path: str, transform=None, *, on_bad_image: str = "skip", seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = SHUFFLE_BUFFER, count_skipped: bool = False,
                 decoder: str = "auto"):
        self.shards = [(p, n if n is not None else _count(p)) for p, n in _shard_list(path)]
        self.total = sum(n for _, n in self.shards)
        if not self.total:
            raise ValueError(f"the shards under {path!r} hold no images")
        self.transform, self.on_bad_image, self.seed = transform, on_bad_image, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.count_skipped, self.epoch, self.decoder = count_skipped, 0, data_mod.jpeg_decoder(decoder)

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:  # per rank
        return self.total // self.world_size

    def _my_shards(self, worker: int, workers: int) -> list[str]:
        order = list(range(len(self.shards)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        mine = order[self.rank::self.world_size] or order  # fewer shards than ranks: all read all
        mine = mine[worker::workers] or mine
        return [self.shards[i][0] for i in mine]

    def _samples(self, paths: list[str]):
        for path in paths:
            with tarfile.open(path, mode="r|") as tar:  # a stream: sequential reads only
                for m in tar:
                    if m.isfile() and not m.name.endswith(".cls"):
                        yield m.name, tar.extractfile(m).read()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch = getattr(self, "batch_size", 1)  # set by the training loop: whole batches per worker
        batches = len(self) // batch
        quota = (batches // workers + (1 if worker < batches % workers else 0)) * batch
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 4099 + self.rank * 131 + worker)
        paths = self._my_shards(worker, workers)
        buffer, made, skipped, bad_in_a_row = [], 0, 0, 0
        cap = max(1, min(self.shuffle_buffer, quota))  # a small set: no sample twice for the buffer's sake

        def stream():
            while True:  # start the shards over if the quota is not reached
                yield from self._samples(paths)

        for key, payload in stream():
            if made >= quota:
                return
            buffer.append((key, payload))
            if len(buffer) < cap:
                continue
            key, payload = buffer.pop(rng.randrange(len(buffer)))
            x = self._decode(key, payload)
            if x is None:
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                if bad_in_a_row >= data_mod.MAX_BAD_IN_A_ROW:
                    raise ValueError(f"{bad_in_a_row} unreadable images in a row in the shards: are they images?")
                continue
            bad_in_a_row, made = 0, made + 1
            yield (x, 0, skipped) if self.count_skipped else (x, 0)
            skipped = 0
        # unreachable: stream() is endless

    def _decode(self, key: str, payload: bytes):
        try:
            img = data_mod.decode_image(payload, lazy=getattr(self.transform, "draft", False), decoder=self.decoder)
            return self.transform(img) if self.transform is not None else img
        except Exception as err:
            if self.on_bad_image == "error":
                raise ValueError(f"cannot read image {key!r} in the shards: {err}") from err
            warnings.warn(f"skipping unreadable image {key!r} in the shards ({type(err).__name__}: {err})",
                          stacklevel=2)
            return None


# ---------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", required=True, help="image folder (flat or class sub-folders)")
    parser.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and shards.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        write_shards(args.data, args.out, args.shard_size)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"mae-fast shards: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="python -m mae_fast.shards",
                                                        description=__doc__.split("\n\n")[0])).parse_args()))
