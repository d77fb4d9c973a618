"""Benchmark of the input pipeline: images per second for a bare PIL decode, data.load_image (modes, EXIF,
size checks), and decode + train_transform through data.build_loader with 0, 1 and 2 workers, on a folder
of JPEGs of a typical face-crop size written to a temporary directory. --per-worker: decode + augment
images/s per worker for JPEGs of the datasets' sizes. --ratio: whether the loader or the model bounds a run.

    python bench/data.py                  # 300 JPEGs of 250x250, train transform at 224, under 2 minutes
    python bench/data.py --n 1000 --resolution 336
    python bench/data.py --threads 1     # on a busy machine: 2 intra-op threads fight other processes
    python bench/data.py --per-worker    # JPEGs of 200 (UTKFace crops), 400 and 600 px (MORPH, CACD photos)
    python bench/data.py --ratio --backbone demo --size 200 --n 512 --threads 1        # on this machine
    python bench/data.py --ratio --backbone ViT-B/16 --device cuda --n 4096 --batch-size 64   # on a GPU

--ratio writes the JPEGs with a labels CSV (and, for ViT-B/16, a random CLIP of that shape as a weight file),
trains on them with train.py (--dataset csv, 2 epochs, train.py's default --workers unless --workers is
given) and reads the last epoch's train_images_per_s from its log.jsonl (its workers warm by then); beside
it, bench/train.py times the same model's training step on tensors already on the device. Their ratio near
1: the model bounds the run; well below 1: the loader does (more workers, or smaller JPEGs, would help).
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# run as a script, this file's folder comes first on sys.path and this file would import itself as `data`
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)
sys.path.append(str(ROOT / "bench"))   # after the root: `train` is train.py, not bench/train.py
import clip_loader  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from memory import MODELS  # noqa: E402  (bench/memory.py: OpenAI's published CLIP sizes)

# the shapes bench/train.py times: its demo backbone is train.py's demo CLIP (here with random weights) and
# the demo's fusion size; ViT-B/16 is OpenAI's shape with a real run's defaults
BACKBONE_OPTIONS = {"demo": ["--clip", "random", "--text-tower", "freeze", "--width", str(train.DEMO_MODEL["width"]),
                             "--heads", str(train.DEMO_MODEL["heads"])],
                    "ViT-B/16": []}


def write_jpegs(folder: Path, n: int, size: int) -> list:
    # face-like content (the synthetic drawings) compresses like a photograph, unlike noise or flat colour
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(data.render_synthetic(i % 101, np.random.default_rng(i), size)).save(path, quality=90)
        paths.append(path)
    return paths


def rate(make_passes, n: int, repeats: int = 1) -> float:
    """Images/second of the best of `repeats` full passes, after a one-item warm-up that starts workers
    and fills caches."""
    next(iter(make_passes()))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in make_passes():
            pass
        best = max(best, n / (time.perf_counter() - start))
    return best


def loader_rate(paths, transform, batch_size, workers):
    """Images/s of load + transform through data.build_loader with that many workers (ended on return)."""
    samples = [data.Sample(str(p), float(i % 101)) for i, p in enumerate(paths)]
    loader = data.build_loader(data.AgeDataset(samples, transform), batch_size, train=True, num_workers=workers,
                               drop_last=False)
    return rate(lambda: loader, len(paths))


def per_worker(args):
    """Decode + augment images/s, in all and per worker, for JPEGs of each of args.sizes."""
    print(f"{args.n} JPEGs per size, load + train_transform at {args.resolution} px via build_loader, batch "
          f"{args.batch_size}, torch threads {args.threads}")
    print("| JPEG side | mean KiB | workers | images/s | images/s per worker |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_jpegs(Path(tmp), args.n, size)
            kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
            for workers in args.worker_counts:
                speed = loader_rate(paths, data.train_transform(args.resolution), args.batch_size, workers)
                print(f"| {size} | {kib:.1f} | {workers} | {speed:.0f} | {speed / workers:.0f} |", flush=True)


def write_csv_dataset(folder: Path, n: int, size: int) -> Path:
    """n JPEGs and a labels CSV (--dataset csv) in folder: 2 validation and 2 test images, the rest train."""
    paths = write_jpegs(folder, n, size)
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "age", "split"])
        for i, path in enumerate(paths):
            writer.writerow([path.name, i % 101, "val" if i < 2 else "test" if i < 4 else "train"])
    return labels


def loader_model_ratio(args):
    """train.py's images/s on JPEGs beside bench/train.py's images/s on device tensors, same model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        labels = write_csv_dataset(folder, args.n, args.size)
        options = list(BACKBONE_OPTIONS[args.backbone])
        if args.backbone == "ViT-B/16":
            torch.save(clip_loader.CLIP(**MODELS["ViT-B/16"]).state_dict(), folder / "vit_b16.pt")
            options += ["--clip", str(folder / "vit_b16.pt")]
        if args.workers is not None:
            options += ["--workers", str(args.workers)]
        command = [sys.executable, str(ROOT / "train.py"), "--dataset", "csv", "--data-root", str(labels),
                   "--epochs", "2", "--batch-size", str(args.batch_size), "--device", args.device,
                   "--out", str(folder / "run"), *options]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"train.py failed:\n{done.stderr[-2000:]}")
        config = json.loads((folder / "run" / "config.json").read_text())
        epochs = [json.loads(line) for line in (folder / "run" / "log.jsonl").read_text().splitlines()]
        fed = [e for e in epochs if e["type"] == "epoch"][-1]["train_images_per_s"]
    timed = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--worker", args.backbone, "linear",
                            args.device, str(args.batch_size), "none", "reread"], capture_output=True, text=True, env=env)
    if timed.returncode != 0:
        raise SystemExit(f"bench/train.py failed:\n{timed.stderr[-2000:]}")
    tensors = json.loads(timed.stdout.strip().splitlines()[-1])["images_per_s"]
    print(f"{args.backbone}, batch {args.batch_size}, {args.device}, {args.n} JPEGs of {args.size} px, "
          f"{config['train']['workers']} loader workers, OMP_NUM_THREADS={args.threads}")
    print(f"train.py on the JPEGs (last of 2 epochs): {fed:.3g} images/s; bench/train.py on device tensors: "
          f"{tensors:.3g} images/s; ratio {fed / tensors:.2f} "
          f"({'the model bounds the run' if fed / tensors > 0.9 else 'the loader bounds the run'})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="number of JPEGs (default 300)")
    parser.add_argument("--size", type=int, default=250, help="JPEG side in pixels (default 250)")
    parser.add_argument("--resolution", type=int, default=224, help="transform output side (default 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="loader batch size (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process (default 2; "
                        "DataLoader workers always use 1)")
    parser.add_argument("--per-worker", action="store_true", help="decode + augment images/s per worker for "
                        "each of --sizes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 400, 600], help="--per-worker: JPEG sides "
                        "(default 200 400 600)")
    parser.add_argument("--worker-counts", type=int, nargs="+", default=[1, 2], help="--per-worker: loader "
                        "workers (default 1 2)")
    parser.add_argument("--ratio", action="store_true", help="train.py's images/s on JPEGs beside bench/train.py's "
                        "on device tensors")
    parser.add_argument("--backbone", default="demo", choices=list(BACKBONE_OPTIONS), help="--ratio: the model "
                        "(default demo)")
    parser.add_argument("--device", default="cpu", help="--ratio: cpu or cuda (default cpu)")
    parser.add_argument("--workers", type=int, default=None, help="--ratio: train.py's --workers (default: "
                        "train.py's own)")
    args = parser.parse_args()
    if min(args.worker_counts) < 1:
        parser.error("--worker-counts: at least 1 worker each")
    torch.set_num_threads(args.threads)
    if args.per_worker:
        return per_worker(args)
    if args.ratio:
        return loader_model_ratio(args)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.n, args.size)
        kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        rows = [("bare PIL decode (open + convert RGB)", "-",
                 rate(lambda: (Image.open(p).convert("RGB") for p in paths), args.n, repeats=3)),
                ("data.load_image", "-", rate(lambda: (data.load_image(p) for p in paths), args.n, repeats=3))]
        for name, transform in (("load + eval_transform", data.eval_transform(args.resolution)),
                                ("load + train_transform", data.train_transform(args.resolution))):
            for workers in ((0,) if name.startswith("load + eval") else (0, 1, 2)):
                rows.append((f"{name} via build_loader", str(workers),
                             loader_rate(paths, transform, args.batch_size, workers)))

    base = rows[0][2]
    print(f"{args.n} JPEGs of {args.size}x{args.size} (mean {kib:.1f} KiB), output {args.resolution}px, "
          f"batch {args.batch_size}, torch threads {args.threads}")
    print(f"| {'pipeline':<44} | workers | images/s | vs bare decode |")
    print(f"|{'-' * 46}|---------|----------|----------------|")
    for name, workers, speed in rows:
        print(f"| {name:<44} | {workers:>7} | {speed:8.0f} | {speed / base:14.2f} |")


if __name__ == "__main__":
    main()
