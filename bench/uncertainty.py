"""What the uncertainty u says about images unlike the training data (README.md#age-intervals).

u is trained to rate the error on images like the training data. This puts a trained run's u on its own
test split (the range a user sees) beside u on images that are no such thing: pictures of uniform noise,
a flat grey picture and, where scikit-image is installed (the [test] extra), its photographs without a
face (a cat, a cup of coffee, a rocket) and one with a face (the astronaut, cropped to it). Each through the
predict API (eval.predict_images) with the run's calibration, so u is in the run's calibrated years. The
table says where each image's u falls among the test images' (its percentile): a u far below the test
images' median is a confident answer to a question the model was never trained on.

    python bench/uncertainty.py --ckpt runs/ablation/full_seed0/best.pt
"""
import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as ev  # noqa: E402


def probe_images(size=256, seed=0):
    """{name: PIL image}: noise, grey and, with scikit-image, its photographs."""
    rng = np.random.default_rng(seed)
    images = {f"uniform noise {i}": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
              for i in range(3)}
    images["flat grey"] = Image.new("RGB", (size, size), (128, 128, 128))
    try:
        from skimage import data as photos
    except ImportError:
        print("scikit-image not installed: noise and grey only (pip install -e \".[test]\")", file=sys.stderr)
        return images
    images.update({"photo: cat (skimage chelsea)": Image.fromarray(photos.chelsea()),
                   "photo: coffee cup (skimage coffee)": Image.fromarray(photos.coffee()),
                   "photo: rocket (skimage rocket)": Image.fromarray(photos.rocket()),
                   # the astronaut's face, a square about it (rows 30-230, columns 140-340 of the 512 x 512 photo)
                   "photo: a face (skimage astronaut, cropped)": Image.fromarray(photos.astronaut()[30:230, 140:340])})
    return images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (RUN/best.pt) with a calibration")
    args = p.parse_args(argv)
    model, calibration = ev.load_model(args.ckpt)
    if calibration is None:
        raise SystemExit(f"{args.ckpt} holds no calibration: u would not be in years")
    with tempfile.TemporaryDirectory() as out:   # the test split's u, as eval.py writes it
        ev.main(["--ckpt", args.ckpt, "--out", out])
        with open(Path(out) / "predictions.csv", newline="") as f:
            test_u = np.array([float(r["uncertainty"]) for r in csv.DictReader(f)])
    print(f"\n{args.ckpt}: u on its {len(test_u)} test images (years): 10th / 50th / 90th percentile "
          f"{np.percentile(test_u, 10):.2f} / {np.percentile(test_u, 50):.2f} / {np.percentile(test_u, 90):.2f}")
    print(f"{'image':<46}{'age':>8}{'u (years)':>11}{'u percentile among test':>26}")
    images = probe_images()
    result = ev.predict_images(model, list(images.values()), calibration)
    for name, age, u in zip(images, result.age, result.uncertainty):
        print(f"{name:<46}{age:>8.1f}{u:>11.2f}{100 * np.mean(test_u < u):>25.0f}%")


if __name__ == "__main__":
    main()
