"""The label distribution's sigma per image (train.py --label-sigma age-std) against the fixed sigma_y, on
synthetic drawings whose training labels are noisy with a known spread per image, as APPA-REAL's
apparent ages are the votes of raters who agree on some faces and not on others.

Each training image's label is its drawn age plus Gaussian noise of std s, s log-uniform on
[S_MIN, S_MAX] and written as the image's age_std; the validation and test labels are the drawn ages
themselves, so their MAE measures how close the model comes to the truth under that noise. Both settings
train the demo's model (train.py's demo options, the demo CLIP) for --epochs on the same CSV, one process
per run, for each seed; the table holds the validation MAE of best.pt, its test MAE, and the means.

    python bench/label_sigma.py                        # 2 settings x 3 seeds, 1500 training drawings
    python bench/label_sigma.py --l1-weight 0          # y0 left to the distribution loss
    python bench/label_sigma.py --seeds 0 --epochs 2   # a quick look

Results go to --out (default runs/label_sigma): the CSV and its images, one run folder per (setting,
seed), results.json.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

S_MIN, S_MAX = 0.5, 12.0   # the spread of the training labels' noise, years (log-uniform between)
SETTINGS = ("fixed", "age-std")


def write_noisy_csv(folder: Path, n: dict, seed: int = 0) -> Path:
    """Synthetic drawings (ages uniform on 0..100) and labels.csv: training rows with their noisy age and
    its std, validation and test rows with the drawn age."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in n.items():
        for i in range(count):
            age = int(rng.integers(0, 101))
            name = f"img/{split}_{i:05d}.png"
            Image.fromarray(data.render_synthetic(age, rng, 64)).save(folder / name)
            if split == "train":
                std = float(np.exp(rng.uniform(np.log(S_MIN), np.log(S_MAX))))
                label = float(np.clip(age + std * rng.standard_normal(), 0, 100))
                rows.append([name, f"{label:.2f}", f"{std:.3f}", split])
            else:
                rows.append([name, age, "", split])
    path = folder / "labels.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "age", "age_std", "split"]] + rows)
    return path


def train_run(labels: Path, setting: str, seed: int, epochs: int, l1_weight: float, out: Path) -> dict:
    """One train.py run in its own process; its test record (val and test MAE of best.pt)."""
    command = [sys.executable, str(ROOT / "train.py"), "--dataset", "csv", "--data-root", str(labels),
               "--label-sigma", setting, "--l1-weight", str(l1_weight), "--seed", str(seed), "--epochs", str(epochs),
               "--augment", "off", "--lr", "1e-3", "--clip-lr", "1e-4", "--width", "64", "--heads", "4",
               "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(r for r in records if r["type"] == "test")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--n", type=int, nargs=3, default=[1500, 300, 300], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--l1-weight", type=float, default=1.0, help="train.py --l1-weight (0: y0 learns from the "
                   "label distribution alone)")
    p.add_argument("--out", default="runs/label_sigma")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    labels = write_noisy_csv(out / "data", dict(zip(("train", "val", "test"), args.n)))
    results = {}
    for seed in args.seeds:
        for setting in SETTINGS:
            results[f"{setting} seed {seed}"] = train_run(labels, setting, seed, args.epochs, args.l1_weight,
                                                           out / f"{setting}_{seed}")
            (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| --label-sigma | " + " | ".join(f"val / test MAE, seed {s}" for s in args.seeds) + " | mean val / test |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for setting in SETTINGS:
        runs = [results[f"{setting} seed {s}"] for s in args.seeds]
        cells = [f"{r['val_mae']:.3f} / {r['test_mae']:.3f}" for r in runs]
        mean = f"{np.mean([r['val_mae'] for r in runs]):.3f} / {np.mean([r['test_mae'] for r in runs]):.3f}"
        print(f"| {setting} | " + " | ".join(cells) + f" | {mean} |")


if __name__ == "__main__":
    main()
