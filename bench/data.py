"""Benchmark of the input pipeline: images per second for a bare PIL decode, data.load_image (modes, EXIF,
size checks), and decode + train_transform through data.build_loader with 0, 1 and 2 workers, on a folder
of JPEGs of a typical face-crop size written to a temporary directory.

    python bench/data.py                  # 300 JPEGs of 250x250, train transform at 224, under 2 minutes
    python bench/data.py --n 1000 --resolution 336
    python bench/data.py --threads 1     # on a busy machine: 2 intra-op threads fight other processes
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# run as a script, this file's folder comes first on sys.path and this file would import itself as `data`
sys.path[0] = str(Path(__file__).resolve().parents[1])
import data  # noqa: E402


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="number of JPEGs (default 300)")
    parser.add_argument("--size", type=int, default=250, help="JPEG side in pixels (default 250)")
    parser.add_argument("--resolution", type=int, default=224, help="transform output side (default 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="loader batch size (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process (default 2; "
                        "DataLoader workers always use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.n, args.size)
        kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        rows = [("bare PIL decode (open + convert RGB)", "-",
                 rate(lambda: (Image.open(p).convert("RGB") for p in paths), args.n, repeats=3)),
                ("data.load_image", "-", rate(lambda: (data.load_image(p) for p in paths), args.n, repeats=3))]
        samples = [data.Sample(str(p), float(i % 101)) for i, p in enumerate(paths)]
        for name, transform in (("load + eval_transform", data.eval_transform(args.resolution)),
                                ("load + train_transform", data.train_transform(args.resolution))):
            for workers in ((0,) if name.startswith("load + eval") else (0, 1, 2)):
                dataset = data.AgeDataset(samples, transform)
                loader = data.build_loader(dataset, args.batch_size, train=True, num_workers=workers,
                                           drop_last=False)
                rows.append((f"{name} via build_loader", str(workers), rate(lambda: loader, args.n)))
                del loader  # ends its persistent workers before the next configuration starts

    base = rows[0][2]
    print(f"{args.n} JPEGs of {args.size}x{args.size} (mean {kib:.1f} KiB), output {args.resolution}px, "
          f"batch {args.batch_size}, torch threads {args.threads}")
    print(f"| {'pipeline':<44} | workers | images/s | vs bare decode |")
    print(f"|{'-' * 46}|---------|----------|----------------|")
    for name, workers, speed in rows:
        print(f"| {name:<44} | {workers:>7} | {speed:8.0f} | {speed / base:14.2f} |")


if __name__ == "__main__":
    main()
