"""Ablation of every abstract claim on the synthetic demo data: one command, a table of means over seeds.

First the demo CLIP (built once by `train.py --objective clip` if the cache lacks it, never per run): how
well its 101 age prompts carry the order of the ages, and its zero-shot test MAE on each seed's split
(eval.py --zero-shot --seed). Then it trains the full model and each ablation with train.py (a fresh
process per run, so runs are independent and each one's wall time is its own), evaluates each run's
best.pt (chosen on validation) on the validation and test splits with eval.py, and prints and writes a
table: the validation MAE, feedback change and Spearman (where the demo's defaults were chosen), the test MAE
mean and std over seeds and its ratio to the mean predictor's (worst seed too), MAE after each feedback
step, the change the feedback makes (last step minus step 0, mean and worst seed), Spearman rank
correlation between the predicted uncertainty and the actual error, wall time and trainable parameters;
then, by seed, how well u states the error in years (mean u / MAE) and the 90% interval's coverage.

    python bench/ablation.py                          # 14 variants x 3 seeds, 2 runs at a time
    python bench/ablation.py --seeds 0 --variants full feedback-off   # a quick look
    python bench/ablation.py --variants augment-on clip-random --out runs/ablation_control   # controls

Runs go in the order given (most telling first) and results.json is rewritten after each, so a run cut
short keeps what it finished.

Nothing is chosen on the test split: every run trains with the demo's settings, and its test figure is
the one of the checkpoint that train.py selected by validation MAE; the demo's defaults were chosen by the
validation columns.

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

# Each abstract claim switched off on its own, and all of them together (README.md#paper-to-code), the
# feedback designs side by side, and the language's controls (random T, a feedback query without text).
VARIANTS = {
    "full": [],                                                      # linear mixer, contrastive, feedback
    "feedback-off": ["--feedback-steps", "0"],                       # claim 4
    "feedback-no-l1-on-y0": ["--l1-weight", "0"],                    # claim 4 with y0 left to the KL (an earlier default)
    "feedback-residual": ["--feedback-design", "residual"],          # claim 4, the first reading
    "feedback-anchored": ["--feedback-design", "anchored"],          # claim 4, also reading the pretrained tower
    "feedback-no-text": ["--feedback-text", "off"],                  # claim 4 without the age text in the query
    "text-random": ["--text-embeddings", "random"],                  # T random everywhere: does language matter
    "uncertainty-l1": ["--uncertainty-loss", "l1"],                  # claim 4, uncertainty trained with L1 (an earlier default)
    "everything-off": ["--depth", "0", "--feedback-steps", "0",      # plain CLIP-prompt classifier,
                       "--contrastive-weight", "0", "--l1-weight", "0"],  # distribution loss only
    "contrastive-off": ["--contrastive-weight", "0"],                # claim 3
    "mixer-none": ["--mixer", "none"],                               # claim 2: global token only
    "mixer-fourier": ["--mixer", "fourier"],                         # claim 2, the abstract's FourierFormer
    "mixer-softmax": ["--mixer", "softmax"],                         # claim 2, the quadratic baseline
    "ce-baseline": ["--method", "ce-baseline"],                      # no claim: a linear head, cross-entropy
}
# Controls that show what a demo setting or the pretraining buys; run with --variants NAME.
CONTROLS = {
    "augment-on": ["--augment", "on"],     # the real-run augmentation on the drawings (the demo trains without)
    "clip-random": ["--clip", "random"],   # the first demo: a random CLIP, both towers trained
}
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
    metrics = {}
    for split in ("val", "test"):   # val: where the demo's defaults were chosen; test: reported
        subprocess.run([sys.executable, "eval.py", "--ckpt", str(out / "best.pt"), "--split", split,
                        "--out", str(out / f"eval_{split}"), "--device", "cpu"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        metrics[split] = json.loads((out / f"eval_{split}" / "metrics.json").read_text())
    test = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"test"' in line][-1]
    steps = lambda m: m.get("mae_per_feedback_step", [m["mae"]])
    return {"variant": variant, "seed": seed, "test_mae": metrics["test"]["mae"], "baseline_mae": test["baseline_mae"],
            "mae_per_step": steps(metrics["test"]), "val_mae": metrics["val"]["mae"],
            "val_mae_per_step": steps(metrics["val"]),
            "val_spearman": metrics["val"].get("spearman_uncertainty_error"),
            "spearman": metrics["test"].get("spearman_uncertainty_error"), "wall_s": wall,
            "params": trainable_parameters(out / "best.pt"),
            # u in calibrated years (eval.uncertainty_calibration) and the 90% interval, on test
            "u_over_mae": metrics["test"].get("uncertainty_calibration", {}).get("mean_uncertainty_over_mae"),
            "coverage_90": metrics["test"].get("interval", {}).get("coverage")}


def zero_shot(seed, args):
    """The demo CLIP's zero-shot test MAE on seed's split, its age prompts' order, and the mean
    predictor's MAE on that split (the training split's mean age, as train.py reports it)."""
    out = Path(args.out) / f"zero-shot_seed{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    # the demo CLIP is OpenAI's architecture: said explicitly, as train.py says it (no warning)
    architecture = ["--clip-activation", "quick_gelu", "--clip-vision-head-width", "64", "--clip-text-head-width", "64"]
    subprocess.run([sys.executable, "eval.py", "--zero-shot", "--clip", str(demo_clip_file()), *architecture,
                    "--dataset", "synthetic", "--seed", str(seed), "--out", str(out), "--device", "cpu"], cwd=ROOT,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    ages = {split: [s.age for s in import_project("data").build_dataset("synthetic", split=split, seed=seed).samples]
            for split in ("train", "test")}
    mean = float(np.mean(ages["train"]))
    baseline = float(np.mean([abs(a - mean) for a in ages["test"]]))
    return {"seed": seed, "test_mae": metrics["mae"], "baseline_mae": baseline,
            "prompt_age_order": metrics["prompt_age_order"]}


def import_project(name):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return __import__(name)


def demo_clip_file():
    """The cached demo CLIP, built (once) if it is missing, and its SHA-256 checked: train.demo_clip."""
    return import_project("train").demo_clip()


def trainable_parameters(path):
    """Parameters the run trained (frozen CLIP towers excluded), from the checkpoint alone: the model's
    constructor sets requires_grad from the saved model config."""
    evaluation = import_project("eval")
    model = evaluation.model_from_checkpoint(evaluation.load_checkpoint(path), path)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarise(rows):
    """One line per variant: means and stds over seeds, ratios to the mean predictor, feedback change."""
    table = []
    for variant in RUNS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        mae = np.array([r["test_mae"] for r in mine])
        ratio = mae / np.array([r["baseline_mae"] for r in mine])
        steps = np.array([r["mae_per_step"] for r in mine])   # (seeds, R+1)
        change = steps[:, -1] - steps[:, 0]
        val_steps = np.array([r["val_mae_per_step"] for r in mine])
        val_change = val_steps[:, -1] - val_steps[:, 0]
        rho = [r["spearman"] for r in mine if r["spearman"] is not None]
        val_rho = [r["val_spearman"] for r in mine if r.get("val_spearman") is not None]
        table.append({"variant": variant, "seeds": len(mine), "mae_mean": float(mae.mean()),
                      "mae_std": float(mae.std(ddof=1)) if len(mae) > 1 else 0.0,
                      "ratio_mean": float(ratio.mean()), "ratio_max": float(ratio.max()),
                      "mae_per_step": [float(s) for s in steps.mean(0)],
                      "feedback_change_mean": float(change.mean()), "feedback_change_max": float(change.max()),
                      "val_mae_mean": float(np.mean([r["val_mae"] for r in mine])),
                      "val_feedback_change_mean": float(val_change.mean()),
                      "val_feedback_change_max": float(val_change.max()),
                      "val_spearman": float(np.mean(val_rho)) if val_rho else None,
                      "spearman": float(np.mean(rho)) if rho else None,
                      "spearman_min": float(np.min(rho)) if rho else None,
                      "wall_s": float(np.mean([r["wall_s"] for r in mine])), "params": mine[0]["params"],
                      "by_seed": {key: [r.get(key) for r in mine] for key in ("seed", "u_over_mae", "coverage_90",
                                                                              "spearman")}})
    return table


def markdown(table, zero):
    lines = []
    if zero:
        ratios = [z["test_mae"] / z["baseline_mae"] for z in zero]
        lines += [f"demo CLIP: age prompts' order (Spearman of cos(T_i, T_j) with -|a_i - a_j|) "
                  f"{zero[0]['prompt_age_order']:.3f}; zero-shot test MAE "
                  + ", ".join(f"{z['test_mae']:.2f} (seed {z['seed']}, mean predictor {z['baseline_mae']:.2f})"
                              for z in zero)
                  + f"; MAE / mean predictor {np.mean(ratios):.2f} (worst seed {np.max(ratios):.2f})", ""]
    lines += ["| variant | seeds | val MAE | val: last step − step 0 (worst seed) | val Spearman(u, abs err) | "
              "test MAE (mean ± std) | "
              "MAE / mean predictor (worst seed) | MAE after feedback steps 0..R | last step − step 0 (worst seed) | "
              "Spearman(u, abs err) (worst seed) | wall s / run | trainable params |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        steps = " → ".join(f"{s:.2f}" for s in t["mae_per_step"])
        change = (f"{t['feedback_change_mean']:+.2f} ({t['feedback_change_max']:+.2f})"
                  if len(t["mae_per_step"]) > 1 else "-")
        val_change = (f"{t['val_feedback_change_mean']:+.2f} ({t['val_feedback_change_max']:+.2f})"
                      if len(t["mae_per_step"]) > 1 else "-")
        rho = f"{t['spearman']:.2f} ({t['spearman_min']:.2f})" if t["spearman"] is not None else "-"
        val_rho = f"{t['val_spearman']:.2f}" if t["val_spearman"] is not None else "-"
        lines.append(f"| {t['variant']} | {t['seeds']} | {t['val_mae_mean']:.2f} | {val_change} | {val_rho} | "
                     f"{t['mae_mean']:.2f} ± {t['mae_std']:.2f} | "
                     f"{t['ratio_mean']:.2f} ({t['ratio_max']:.2f}) | {steps} | {change} | {rho} | "
                     f"{t['wall_s']:.0f} | {t['params'] / 1e6:.2f}M |")
    lines += ["", "| variant | seeds | mean u / MAE on test, by seed | 90% interval coverage on test, by seed | "
              "Spearman(u, abs err) on test, by seed |", "|---|---|---|---|---|"]
    by_seed = lambda values: ", ".join("-" if v is None else f"{v:.2f}" for v in values)
    for t in table:
        b = t["by_seed"]
        lines.append(f"| {t['variant']} | {', '.join(map(str, b['seed']))} | {by_seed(b['u_over_mae'])} | "
                     f"{by_seed(b['coverage_90'])} | {by_seed(b['spearman'])} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(RUNS),
                   help="the ablations; controls: " + ", ".join(CONTROLS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the demo CLIP's zero-shot evaluation")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="extra train.py options for every run (put last), e.g. --epochs 8")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    demo_clip_file()   # built here once if need be, not by every run
    todo = [(v, s) for v in args.variants for s in args.seeds]
    rows, zero = [], []

    def save():
        (out / "results.json").write_text(json.dumps({"zero_shot": zero, "runs": rows,
                                                      "table": summarise(rows)}, indent=2))

    with ThreadPoolExecutor(args.jobs) as pool:
        zero_jobs = [] if args.no_zero_shot else [pool.submit(zero_shot, s, args) for s in args.seeds]
        for row in pool.map(lambda vs: run(*vs, args), todo):   # in order, as each finishes
            rows.append(row)
            save()
        zero = [job.result() for job in zero_jobs]
    save()
    text = markdown(summarise(rows), zero)
    print(text)
    print(f"\n{len(rows)} runs in {(time.time() - start) / 60:.1f} min "
          f"({args.jobs} at a time, {args.threads} thread(s) each); train.py options: "
          f"{' '.join(args.train_args) or '(demo defaults)'}")
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
