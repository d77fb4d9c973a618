"""Ablation of every abstract claim on the synthetic demo data: one command, a table of means over seeds.

Trains the full model and each ablation with train.py (a fresh process per run, so runs are independent
and each one's wall time is its own), evaluates each run's best.pt (chosen on validation) on the test
split with eval.py, and prints and writes a table: test MAE mean and std over seeds, MAE after each
feedback step, Spearman rank correlation between the predicted uncertainty and the actual error,
wall time and trainable parameter count.

    python bench/ablation.py                          # 7 variants x 3 seeds, 2 runs at a time, ~40 min on 2 cores
    python bench/ablation.py --seeds 0 --variants full feedback-off   # a quick look
    python bench/ablation.py --variants feedback-off-l1x2 --out runs/ablation_control   # a control, see CONTROLS

Nothing is chosen on the test split: every run trains with the demo's settings, and its test figure is
the one of the checkpoint that train.py selected by validation MAE.

Results go to --out (default runs/ablation): one run folder per (variant, seed), results.json and
table.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Each abstract claim switched off on its own, and all of them together (METHOD.md, README's map).
VARIANTS = {
    "full": [],                                                      # linear mixer, contrastive, feedback
    "mixer-fourier": ["--mixer", "fourier"],                         # claim 2, the abstract's FourierFormer
    "mixer-softmax": ["--mixer", "softmax"],                         # claim 2, the quadratic baseline
    "mixer-none": ["--mixer", "none"],                               # claim 2: global token only
    "contrastive-off": ["--contrastive-weight", "0"],                # claim 3
    "feedback-off": ["--feedback-steps", "0"],                       # claim 4
    "everything-off": ["--depth", "0", "--feedback-steps", "0",      # plain CLIP-prompt classifier,
                       "--contrastive-weight", "0", "--l1-weight", "0"],  # distribution loss only
}
# Controls that separate a component's effect from its loss term; run with --variants NAME.
CONTROLS = {
    "feedback-off-l1x2": ["--feedback-steps", "0", "--l1-weight", "2"],  # feedback off, but y0 gets the
}                                                                        # second L1 the feedback loss adds
RUNS = {**VARIANTS, **CONTROLS}


def run(variant, seed, args):
    """Train then evaluate one (variant, seed); returns its row of figures."""
    out = Path(args.out) / f"{variant}_seed{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    train = [sys.executable, "train.py", "--out", str(out), "--seed", str(seed), "--device", "cpu",
             *RUNS[variant], *args.train_args]
    start = time.time()
    subprocess.run(train, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - start
    subprocess.run([sys.executable, "eval.py", "--ckpt", str(out / "best.pt"), "--out", str(out / "eval"),
                    "--device", "cpu"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    return {"variant": variant, "seed": seed, "test_mae": metrics["mae"],
            "mae_per_step": metrics.get("mae_per_feedback_step", [metrics["mae"]]),
            "spearman": metrics.get("spearman_uncertainty_error"), "wall_s": wall,
            "params": trainable_parameters(out / "best.pt")}


def trainable_parameters(path):
    """Parameters the run trained (frozen CLIP towers excluded), from the checkpoint alone: the model's
    constructor sets requires_grad from the saved CILFConfig."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import eval as evaluation
    model = evaluation.model_from_checkpoint(evaluation.load_checkpoint(path), path)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarise(rows):
    """One line per variant: means and stds over seeds."""
    table = []
    for variant in RUNS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        mae = np.array([r["test_mae"] for r in mine])
        steps = np.array([r["mae_per_step"] for r in mine]).mean(0)
        rho = [r["spearman"] for r in mine if r["spearman"] is not None]
        table.append({"variant": variant, "seeds": len(mine), "mae_mean": float(mae.mean()),
                      "mae_std": float(mae.std(ddof=1)) if len(mae) > 1 else 0.0,
                      "mae_per_step": [float(s) for s in steps],
                      "spearman": float(np.mean(rho)) if rho else None,
                      "wall_s": float(np.mean([r["wall_s"] for r in mine])), "params": mine[0]["params"]})
    return table


def markdown(table):
    lines = ["| variant | seeds | test MAE (mean ± std) | MAE after feedback steps 0..R | Spearman(u, abs err) "
             "| wall s / run | trainable params |",
             "|---|---|---|---|---|---|---|"]
    for t in table:
        steps = " → ".join(f"{s:.2f}" for s in t["mae_per_step"])
        rho = f"{t['spearman']:.2f}" if t["spearman"] is not None else "-"
        lines.append(f"| {t['variant']} | {t['seeds']} | {t['mae_mean']:.2f} ± {t['mae_std']:.2f} | {steps} | "
                     f"{rho} | {t['wall_s']:.0f} | {t['params'] / 1e6:.2f}M |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(RUNS),
                   help="the ablations; controls: " + ", ".join(CONTROLS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="extra train.py options for every run (put last), e.g. --epochs 8")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for v in args.variants for s in args.seeds]
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda vs: run(*vs, args), todo))
    table = summarise(rows)
    text = markdown(table)
    print(text)
    print(f"\n{len(rows)} runs in {(time.time() - start) / 60:.1f} min "
          f"({args.jobs} at a time, {args.threads} thread(s) each); train.py options: "
          f"{' '.join(args.train_args) or '(demo defaults)'}")
    (Path(args.out) / "results.json").write_text(json.dumps({"runs": rows, "table": table}, indent=2))
    (Path(args.out) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
