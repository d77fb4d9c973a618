"""Aligned face crops: the demo written as a benchmark database, what cropping costs, and what aligning a
folder of photos costs.

    python bench/aligned.py demo-database --seed 0 --out runs/aligned_demo/seed0   # then train.py on it
    python bench/aligned.py crops --n 300 --threads 1      # crops/s: warped on the fly vs read from a cache
    python bench/aligned.py align --n 40 --threads 1       # data.py align: photos/s with MTCNN on the CPU

demo-database draws the demo's drawings (data.SyntheticAgeDataset, same seed, same train/val/test) and
pastes each one rotated (-45..45 degrees) and scaled (0.8..1.6) at a random place into a larger canvas of
random colour and noise. It writes canvases/NNNNN.png, database.json (the benchmark's format: the
drawing's corners as aligned_bbox, the demo's train split in folders 0-5, val in 6-7, test in 8-9, so
split 0 is the demo's split) and raw.csv (path, age, split: the same canvases uncropped, for
--dataset csv). Entries are in the demo's order, so a run sees its batches in the demo's order.
"""
import argparse
import csv
import json
import math
import shutil
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

DEMO_RESOLUTION = 32  # the demo CLIP's input
FOLDERS = {"train": range(6), "val": (6, 7), "test": (8, 9)}  # the benchmark's split 0


def paste(drawing: Image.Image, canvas_size: int, rng: np.random.Generator):
    """(canvas, box): the drawing rotated, scaled and placed at random on a noisy canvas, and the drawing's
    corners in the canvas as the benchmark's aligned_bbox (1-based pixel coordinates of the centres of the
    drawing's corner pixels, A top left, then B, C, D around)."""
    side = drawing.width
    scale, angle = rng.uniform(0.8, 1.6), math.radians(rng.uniform(-45, 45))
    reach = side * scale / math.sqrt(2)  # half the diagonal: the pasted drawing stays inside the canvas
    centre = rng.uniform(reach, canvas_size - reach, 2)
    rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale
    # PIL's affine maps output coordinates (pixel centres at + 0.5) to input ones: the inverse placement
    inverse = np.linalg.inv(rotate)
    offset = side / 2 - inverse @ centre
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    size = (canvas_size, canvas_size)
    background = rng.uniform(0, 255, 3) + rng.normal(0, 20, (canvas_size, canvas_size, 3))
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    mask = Image.new("L", drawing.size, 255).transform(size, Image.Transform.AFFINE, coefficients,
                                                        resample=Image.Resampling.BILINEAR)
    canvas.paste(drawing.transform(size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BICUBIC),
                 (0, 0), mask)
    corners = np.array([[0.5, 0.5], [side - 0.5, 0.5], [side - 0.5, side - 0.5], [0.5, side - 0.5]])
    placed = (corners - side / 2) @ rotate.T + centre + 0.5  # continuous -> 1-based pixel coordinates
    return canvas, [round(float(v), 2) for v in placed.flatten()]


def write_demo_database(out: Path, seed: int, canvas_size: int):
    (out / "canvases").mkdir(parents=True, exist_ok=True)
    entries, rows, index = [], [], 0
    for split, folders in FOLDERS.items():
        drawings = data.SyntheticAgeDataset(split, seed=seed, image_size=data.synthetic_image_size(DEMO_RESOLUTION))
        for i, sample in enumerate(drawings.samples):
            canvas, box = paste(drawings.image(i), canvas_size, np.random.default_rng([seed, 11, index]))
            name = f"canvases/{index:05d}.png"
            canvas.save(out / name)
            entries.append({"img_path": name, "id_num": index, "age": int(sample.age), "gender": "U",
                            "database": "demo", "folder": folders[i % len(folders)], "aligned_bbox": box})
            rows.append([name, int(sample.age), split])
            index += 1
    (out / "database.json").write_text(json.dumps(entries, indent=1), encoding="utf-8")
    with open(out / "raw.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["path", "age", "split"], *rows])
    print(f"wrote {index} canvases of {canvas_size}x{canvas_size}, {out / 'database.json'} and {out / 'raw.csv'}")


def rate(function, items) -> float:
    """Items per second of function over items (after one warm-up call)."""
    function(items[0])
    start = time.perf_counter()
    for item in items:
        function(item)
    return len(items) / (time.perf_counter() - start)


def measure_crops(n: int, photo_size: int, resolution: int):
    """Crops per second at the benchmark's sizes: from a photograph (a drawing pasted into a JPEG of
    photo_size) warped on the fly, against a cache of the crops read back (PNG, lossless, and JPEG)."""
    crop_size = data.aligned_crop_size(resolution)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = []
        for i in range(n):
            rng = np.random.default_rng([i, 5])
            drawing = Image.fromarray(data.render_synthetic(i % 101, rng, photo_size // 3))
            canvas, box = paste(drawing, photo_size, rng)
            canvas.save(tmp / f"{i}.jpg", quality=90)
            photos.append(data.Sample(str(tmp / f"{i}.jpg"), float(i % 101), box=tuple(box)))
        faces = data.AlignedFaces(photos, None, data.ALIGN_MARGIN, crop_size)
        for i in range(n):
            crop = faces.image(i)
            crop.save(tmp / f"{i}.crop.png")
            crop.save(tmp / f"{i}.crop.jpg", quality=95)
        eval_view = data.aligned_transform(resolution, train=False)
        rows = [("decode the photo only (load_image)", rate(lambda i: data.load_image(photos[i].path), range(n))),
                ("decode + crop_aligned (on the fly)", rate(faces.image, range(n))),
                ("decode + crop_aligned + eval transform", rate(lambda i: eval_view(faces.image(i)), range(n))),
                ("read a cached PNG crop", rate(lambda i: data.load_image(tmp / f"{i}.crop.png"), range(n))),
                ("read a cached JPEG crop", rate(lambda i: data.load_image(tmp / f"{i}.crop.jpg"), range(n))),
                ("read a cached PNG crop + eval transform",
                 rate(lambda i: eval_view(data.load_image(tmp / f"{i}.crop.png")), range(n)))]
    print(f"{n} JPEG photos of {photo_size}x{photo_size}, crops of {crop_size} for a {resolution} input, "
          f"{torch.get_num_threads()} torch thread(s), one process")
    print(f"| {'pipeline':<42} | crops/s |")
    print(f"|{'-' * 44}|---------|")
    for name, speed in rows:
        print(f"| {name:<42} | {speed:7.0f} |")


def measure_align(n: int, photo_size: int):
    """`python data.py align` on n photos (drawings pasted in canvases, and the bundled astronaut photo,
    which has a real face): photos per second, MTCNN on the CPU."""
    skimage_data = __import__("skimage.data", fromlist=["astronaut"])
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "aligned"
        raw.mkdir()
        astronaut = Image.fromarray(skimage_data.astronaut()).resize((photo_size, photo_size))
        for i in range(n):
            astronaut.rotate(i * 7 % 40 - 20).save(raw / f"{i:03d}.jpg", quality=90)
        start = time.perf_counter()
        counts = data.align_folder(raw, out, size=data.aligned_crop_size(256))
        seconds = time.perf_counter() - start
        shutil.rmtree(out)
    print(f"{n} photos of {photo_size}x{photo_size} (the astronaut, rotated): {counts['aligned']} aligned, "
          f"{len(counts['no face'])} without a face, {n / seconds:.1f} photos/s (model loading included, "
          f"{torch.get_num_threads()} torch thread(s))")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-database", help="write the demo's drawings as a benchmark database")
    demo.add_argument("--seed", type=int, default=0, help="the demo's seed (default 0)")
    demo.add_argument("--canvas", type=int, default=96, help="canvas side in pixels (default 96)")
    demo.add_argument("--out", type=Path, required=True, help="folder to write")
    crops = commands.add_parser("crops", help="crops/s on the fly vs cached")
    crops.add_argument("--n", type=int, default=300, help="photos (default 300)")
    crops.add_argument("--photo-size", type=int, default=480, help="photo side (default 480, MORPH's width is 400)")
    crops.add_argument("--resolution", type=int, default=256, help="model input (default 256, the benchmark's)")
    align = commands.add_parser("align", help="data.py align photos/s with MTCNN")
    align.add_argument("--n", type=int, default=40, help="photos (default 40)")
    align.add_argument("--photo-size", type=int, default=480, help="photo side (default 480)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "demo-database":
        write_demo_database(args.out, args.seed, args.canvas)
    elif args.command == "crops":
        measure_crops(args.n, args.photo_size, args.resolution)
    else:
        measure_align(args.n, args.photo_size)


if __name__ == "__main__":
    main()
