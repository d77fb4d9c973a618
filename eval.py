"""Evaluation of CILF-CIAE age estimators: the field's metrics, a trained model rebuilt from its checkpoint
alone, zero-shot CLIP, age intervals with guaranteed coverage, and predictions for any photos (faces found
first with --detect-faces), also from other code (load_model, predict_images).

Run:
    python eval.py --ckpt runs/demo/best.pt                      # the run's own dataset, test split
    python eval.py --ckpt RUN/best.pt --split val --out RUN/eval_val
    python eval.py --ckpt RUN/best.pt --dataset utkface --data-root /data/UTKFace --split test
    python eval.py --zero-shot --clip ViT-B-16.pt --dataset utkface --data-root /data/UTKFace
    python eval.py --ckpt RUN/best.pt --images photos/ face.jpg  # no labels: writes predictions.csv
    python eval.py --ckpt RUN/best.pt --plot                     # plus cs_curve, scatter, reliability .png (matplotlib)
    python eval.py --ckpt RUN/best.pt --images photos/ --detect-faces   # one row per face (the [faces] extra)
    python eval.py --ckpt RUN/best.pt --database FG-Net_aligned.json --split all   # facebase: cross-dataset
    python eval.py --ckpt RUN/best.pt --interval 0.95            # the 95% interval; --calibrate-on calibration: old runs
    python eval.py --ckpt RUN/best.pt --tta flip                 # each image's and its mirror's predictions averaged
    python eval.py --summarize runs/morph_split*/eval_test       # mean +- std over splits, per test set

Sections:
    1. metrics                 mae, cumulative_score, epsilon_error, mae_per_decade, spearman,
                               uncertainty_calibration, compute_metrics
    2. calibration             calibrate (u in years, then conformal intervals), uncertainty_in_years,
                               level_quantiles, conformal_interval, interval_metrics
    3. prediction              predict (with test-time flip averaging), predict_dataset
    4. command line            parse_args, main, the checks against the run, the output files, --summarize
    5. photos                  image files (read one at a time), faces, the predict API (load_model, predict_images)
    6. shared with train.py    option types, atomic files, devices, checkpoints (every field checked on load:
                               checkpoint_problem; a saved option: saved_option_problem), CLIP options
"""
import os

# As in train.py: OpenMP threads that spin while waiting make a shared CPU many times slower; must be set
# before torch loads OpenMP, and an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import csv
import io
import json
import math
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

import clip_loader
import data
from feedback import UNCERTAINTY_LOSSES
from linear_attention import MIXERS
from model import (FEEDBACK_DESIGNS, MAX_FEEDBACK_STEPS, MODELS, TEXT_EMBEDDINGS, CILFCIAE, CILFConfig, check_prompts_fit,
                   config_problem, weight_shapes)

__all__ = [
    # 1. metrics, 2. conformal intervals, 3. prediction
    "mae", "cumulative_score", "epsilon_error", "mae_per_decade", "spearman", "prompt_age_order",
    "uncertainty_calibration", "compute_metrics", "format_table", "CONFORMAL_LEVELS", "MIN_CALIBRATION_SUBJECTS",
    "conformal_quantile", "conformal_scores", "calibrate", "uncertainty_in_years",
    "level_quantiles", "conformal_interval", "interval_metrics", "model_transform", "TTA_MODES", "predict",
    "predict_dataset",
    # 4. command line, 5. photos
    "main", "check_data_unchanged", "check_no_training_overlap", "write_predictions", "metrics_files",
    "read_metrics", "summarize_metrics", "format_summary", "image_paths",
    "predict_files", "face_detector", "face_crop", "Prediction", "load_model", "predict_images",
    # 6. shared with train.py
    "positive_int", "non_negative_int", "positive_float", "non_negative_float", "fraction",
    "probability_below_one", "coverage_level", "feedback_step_count", "face_margin", "MAX_FACE_MARGIN", "device_name",
    "prompt_template",
    "MAX_TEMPLATE_CHARS", "one_line_warnings",
    "atomic_write", "write_text", "write_json", "select_device", "AMP_DTYPES", "configure_device",
    "amp_option_dtype", "autocast_dtype", "autocast", "move_to",
    "load_checkpoint", "checkpoint_problem", "saved_option_problem", "exit_on_checkpoint_error",
    "model_from_checkpoint",
    "add_clip_options", "load_clip", "clip_record",
]


# ----------------------------------------------------------------------------- 1. metrics
# The metrics of README.md#training-and-evaluation-practice: MAE, the cumulative score CS(theta) for
# theta = 0..10, the epsilon-error where an apparent-age standard deviation is given, the MAE per age
# decade, and how well the predicted uncertainty ranks the actual error. The last one is abstract claim 4
# made measurable: the error feedback is said to "tell the model how good its prediction is", so its
# uncertainty should rank |error| (Spearman); the MAE after each feedback step shows whether the
# correction corrects. Section 2 turns that uncertainty into an age interval.

def mae(pred, true):
    """Mean absolute error, in years."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    return float(np.abs(pred - true).mean())


def cumulative_score(pred, true, thetas=range(11)):
    """CS(theta): the fraction of images whose absolute error is at most theta years, for each theta."""
    err = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64))
    return {int(t): float((err <= t).mean()) for t in thetas}


def epsilon_error(pred, mu, sigma):
    """ChaLearn LAP epsilon-error: mean of 1 - exp(-(y_hat - mu)^2 / (2 sigma^2)).

    mu and sigma are the mean and standard deviation of the apparent age given by the annotators;
    0 is a perfect score, 1 the worst.
    """
    pred, mu, sigma = (np.asarray(a, dtype=np.float64) for a in (pred, mu, sigma))
    if np.any(sigma <= 0):
        raise ValueError("epsilon_error needs every apparent-age standard deviation > 0")
    return float(np.mean(1.0 - np.exp(-((pred - mu) ** 2) / (2.0 * sigma ** 2))))


def mae_per_decade(pred, true):
    """MAE within each true-age decade: {"0-9": {"n": count, "mae": years}, "10-19": ...}, sorted."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    decade = (np.floor(true / 10) * 10).astype(int)
    return {f"{d}-{d + 9}": {"n": int((decade == d).sum()),
                             "mae": float(np.abs(pred - true)[decade == d].mean())}
            for d in sorted(set(decade.tolist()))}


def _average_ranks(x):
    """1-based ranks; tied values share the mean of the ranks they occupy (as scipy's rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0   # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(a, b):
    """Spearman rank correlation (Pearson correlation of average ranks); nan if either side is constant."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def prompt_age_order(text_emb, ages):
    """Do the age prompts carry the order of the ages? Spearman between cos(T_i, T_j) and -|a_i - a_j|
    over every pair i < j of the K prompts: 1 when nearer ages always have more similar prompts.
    text_emb (K, E) tensor, ages (K,)."""
    t = torch.nn.functional.normalize(text_emb.detach().float().cpu(), dim=-1)
    a = torch.as_tensor(ages, dtype=torch.float64).cpu()
    i, j = torch.triu_indices(len(a), len(a), offset=1)
    return spearman((t[i] * t[j]).sum(-1).numpy(), -(a[i] - a[j]).abs().numpy())


def uncertainty_calibration(uncertainty, pred, true, bins=5):
    """Whether u says the error in years: mean(u) / MAE over all images (1 for a u in calibrated years) and
    a reliability table, the images in `bins` equal-count bins of u (quintiles), each bin's mean u beside
    its mean |error| (equal where u is calibrated image by image, not only on average)."""
    u = np.maximum(np.asarray(uncertainty, dtype=np.float64), 0.0)
    error = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64))
    groups = [g for g in np.array_split(np.argsort(u, kind="stable"), bins) if len(g)]
    return {"mean_uncertainty_over_mae": float(u.mean() / error.mean()) if error.mean() > 0 else None,
            "bins": [{"n": int(len(g)), "mean_uncertainty": float(u[g].mean()),
                      "mean_abs_error": float(error[g].mean())} for g in groups]}


def compute_metrics(pred, true, ages_per_step=None, uncertainty=None, age_std=None):
    """Every metric of README.md#training-and-evaluation-practice as one JSON-able dict.

    ages_per_step (N, R+1): predictions after each feedback step (step 0 = before any correction);
    uncertainty (N,): the model's predicted |error|; age_std (N,) with nan where unknown.
    """
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    metrics = {"n": int(len(true)), "mae": mae(pred, true), "cs": cumulative_score(pred, true),
               "mae_per_decade": mae_per_decade(pred, true)}
    if ages_per_step is not None:
        steps = np.asarray(ages_per_step, dtype=np.float64)
        metrics["mae_per_feedback_step"] = [mae(steps[:, r], true) for r in range(steps.shape[1])]
    if uncertainty is not None and np.any(np.asarray(uncertainty) != 0):
        metrics["spearman_uncertainty_error"] = spearman(uncertainty, np.abs(pred - true))
        metrics["uncertainty_calibration"] = uncertainty_calibration(uncertainty, pred, true)
    if age_std is not None:
        std = np.asarray(age_std, dtype=np.float64)
        known = np.isfinite(std) & (std > 0)
        if known.any():   # apparent-age datasets (ChaLearn LAP / APPA-REAL): true is the mean vote
            metrics["epsilon_error"] = epsilon_error(pred[known], true[known], std[known])
            metrics["epsilon_n"] = int(known.sum())
    return metrics


def format_table(metrics, title=""):
    """The metrics as a plain-text table for the terminal."""
    lines = [title] if title else []
    lines.append(f"{'images':<28}{metrics['n']:>10d}")
    lines.append(f"{'MAE (years)':<28}{metrics['mae']:>10.3f}")
    if "epsilon_error" in metrics:
        lines.append(f"{'epsilon-error':<28}{metrics['epsilon_error']:>10.4f}")
    if "spearman_uncertainty_error" in metrics:
        lines.append(f"{'Spearman(uncertainty,|err|)':<28}{metrics['spearman_uncertainty_error']:>10.3f}")
    if "uncertainty_calibration" in metrics:
        calibration = metrics["uncertainty_calibration"]
        ratio = calibration["mean_uncertainty_over_mae"]
        lines.append(f"{'mean uncertainty / MAE':<28}{'-' if ratio is None else f'{ratio:.3f}':>10}")
        lines.append("  quintiles of u: mean u / mean |error| (years): " + ", ".join(
            f"{b['mean_uncertainty']:.1f}/{b['mean_abs_error']:.1f}" for b in calibration["bins"]))
    if "interval" in metrics:
        iv = metrics["interval"]
        width = lambda w: "inf" if w is None else f"{w:.2f}"
        label = f"{100 * iv['level']:g}% interval coverage"
        lines.append(f"{label:<28}{iv['coverage']:>10.3f}   mean width {width(iv['mean_width'])} y "
                     f"(plain conformal: coverage {iv['plain_coverage']:.3f}, width {width(iv['plain_mean_width'])} y)")
    if "prompt_age_order" in metrics:
        lines.append(f"{'age prompts ordered (rho)':<28}{metrics['prompt_age_order']:>10.3f}")
    for r, value in enumerate(metrics.get("mae_per_feedback_step", [])):
        lines.append(f"{f'MAE after feedback step {r}':<28}{value:>10.3f}")
    lines.append("CS(theta), % of images with |error| <= theta years:")
    thetas = sorted(metrics["cs"])
    lines.append("  theta " + "".join(f"{t:>6d}" for t in thetas))
    lines.append("  CS %  " + "".join(f"{100 * metrics['cs'][t]:>6.1f}" for t in thetas))
    lines.append("MAE per true-age decade:")
    for decade, row in metrics["mae_per_decade"].items():
        lines.append(f"  {decade:<8}n={row['n']:<7d}MAE {row['mae']:.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 2. calibration
# Split conformal prediction (Vovk et al. 2005; Lei et al. 2018), normalised by the model's own uncertainty
# u (the error feedback's predicted |error|, abstract claim 4), first scaled to years on the same images
# (calibrate). On n calibration images with scores s_i = |y_i - y_hat_i| / (u_i + delta), q = the ceil((n + 1)(1 - alpha))-th smallest s_i, the interval
# y_hat +- q (u + delta) holds the true age of a new image with probability >= 1 - alpha, whatever the
# model, provided the calibration and test images are exchangeable (same dataset, same protocol). The plain
# interval (u ignored, score |y - y_hat|) has the same guarantee and a constant width; the normalised one
# is narrower on average only where u ranks the error.

CONFORMAL_LEVELS = (0.8, 0.9, 0.95)   # stored in best.pt by train.py
# Years added to u: a model sure of itself (u -> 0) would otherwise get a zero-width interval from any
# small score, and a model without feedback (u = 0 everywhere) gets the plain interval scaled by 1/delta.
CONFORMAL_DELTA = 1.0
# Fewer calibration subjects than this: train.py warns (the coverage then varies widely from draw to draw).
MIN_CALIBRATION_SUBJECTS = 30


def level_key(level):
    """The calibration's dict key of a coverage level: 0.9 -> "0.9"."""
    return f"{level:g}"


def conformal_quantile(scores, level):
    """The ceil((n + 1) level)-th smallest of n scores: the (1 - alpha) quantile with split conformal's
    finite-sample correction (level = 1 - alpha). inf when n is too small for the level (the interval is
    then the whole line: n >= 1 / (1 - level) - 1 calibration images are needed for a finite one)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * level - 1e-9)   # -1e-9: (n + 1) level is often x.0000000001
    return float(scores[rank - 1]) if rank <= len(scores) else float("inf")


def conformal_scores(pred, target, uncertainty, delta=CONFORMAL_DELTA):
    """|y - y_hat| / (u + delta) per image (u below 0 counts as 0)."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return np.abs(target - pred) / (np.maximum(np.asarray(uncertainty, dtype=np.float64), 0.0) + delta)


def calibrate(pred, target, uncertainty, source, levels=CONFORMAL_LEVELS, delta=CONFORMAL_DELTA):
    """Calibration on labelled images the model was neither trained nor selected on (the calibration part
    of the validation split), from the model's own u: first u's scale in years, uncertainty_scale =
    mean |error| / mean u (u is trained on training images, whose errors are smaller than a new image's),
    then split conformal on the scaled u, per level the quantile of the normalised score and of the plain
    |error|. Plain data (str, float), as stored in a checkpoint."""
    abs_error = np.abs(np.asarray(target, dtype=np.float64) - np.asarray(pred, dtype=np.float64))
    u = np.maximum(np.asarray(uncertainty, dtype=np.float64), 0.0)
    scale = float(abs_error.mean() / u.mean()) if u.mean() > 0 else 1.0   # u = 0: a model without feedback
    scores = conformal_scores(pred, target, scale * u, delta)
    return {"source": source, "n": int(len(scores)), "delta": float(delta), "uncertainty_scale": scale,
            "quantiles": {level_key(level): {"normalised": conformal_quantile(scores, level),
                                             "plain": conformal_quantile(abs_error, level)} for level in levels}}


def uncertainty_in_years(uncertainty, calibration):
    """The model's u (numpy) in calibrated years: times the calibration's uncertainty_scale (a calibration
    from before the scale existed: u as the model gives it). What intervals, predictions.csv and the
    predict API use."""
    return np.asarray(uncertainty, dtype=np.float64) * calibration.get("uncertainty_scale", 1.0)


def level_quantiles(calibration, level):
    """The calibration's quantiles at `level`; a level it was not calibrated for is a ValueError naming the
    levels it was."""
    if level_key(level) not in calibration["quantiles"]:
        raise ValueError(f"no interval at level {level:g}: the calibration holds levels "
                         f"{', '.join(calibration['quantiles'])} only")
    return calibration["quantiles"][level_key(level)]


def conformal_interval(pred, uncertainty, calibration, level, plain=False):
    """(lower, upper) numpy arrays for u in years (uncertainty_in_years): y_hat -+ q (u + delta), or y_hat -+ q_plain with plain=True."""
    pred = np.asarray(pred, dtype=np.float64)
    q = level_quantiles(calibration, level)
    if plain:
        half = np.full_like(pred, q["plain"])
    else:
        half = q["normalised"] * (np.maximum(np.asarray(uncertainty, dtype=np.float64), 0.0)
                                  + calibration["delta"])
    return pred - half, pred + half


def interval_metrics(pred, target, uncertainty, calibration, level):
    """Coverage (share of true ages inside) and mean width (years) of the normalised interval, and the
    plain interval's for comparison; widths that are infinite (too few calibration images) are None."""
    target = np.asarray(target, dtype=np.float64)
    out = {"level": float(level), "calibration": calibration["source"], "calibration_n": calibration["n"]}
    for name, plain in (("", False), ("plain_", True)):
        lower, upper = conformal_interval(pred, uncertainty, calibration, level, plain)
        width = float(np.mean(upper - lower))
        out[name + "coverage"] = float(np.mean((lower <= target) & (target <= upper)))
        out[name + "mean_width"] = width if math.isfinite(width) else None
    return out


# ----------------------------------------------------------------------------- 3. prediction

def model_transform(model):
    """The evaluation transform of a loaded model: its CLIP's own input resolution, mean and std (OpenAI's,
    or what a Hugging Face or open_clip config stated, which differ), never clip_loader's defaults."""
    return data.eval_transform(model.clip.visual.input_resolution, model.clip.image_mean, model.clip.image_std)


# Test-time augmentation: none, or flip (the predictions for the image and for its mirror image, averaged).
TTA_MODES = ("none", "flip")


@torch.no_grad()
def predict(model, loader, device, amp_dtype=None, zero_shot=False, tta="none"):
    """Run model over loader (in order). Returns numpy arrays: age (N,), ages_per_step (N, R+1),
    uncertainty (N,), target (N,) (nan where the loader has no labels). tta "flip": each of age,
    ages_per_step and uncertainty is the mean of the image's and its mirror image's (the preprocessed
    image flipped left to right, as a training flip would show it)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    model.eval()
    forward = model.zero_shot if zero_shot else model
    out = {"age": [], "ages_per_step": [], "uncertainty": [], "target": []}
    for batch in loader:
        if batch is None:   # every image of the batch was unreadable (data.collate_readable)
            continue
        images, target = batch
        images = move_to(images, device)
        with autocast(device, amp_dtype):
            # images (B, 3, H, W): flip(-1) mirrors the width
            views = [forward(images)] + ([forward(images.flip(-1))] if tta == "flip" else [])
        for key in ("age", "ages_per_step", "uncertainty"):
            out[key].append(torch.stack([getattr(v, key).float() for v in views]).mean(0).cpu())
        out["target"].append(target.float())
    if not out["age"]:
        return {k: np.zeros((0, 1) if k == "ages_per_step" else 0) for k in out}
    return {k: torch.cat(v).numpy().astype(np.float64) for k, v in out.items()}


def predict_dataset(model, dataset, args, device, zero_shot=False, tta="none"):
    """(predict's arrays, samples) of a drop_unreadable dataset: unreadable images are left out and
    counted, exactly as in train.py's evaluation (data.AgeDataset). Under args.amp's autocast."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=data.collate_readable)
    amp_dtype = amp_option_dtype(args.amp, device)
    result, samples = predict(model, loader, device, amp_dtype, zero_shot, tta), dataset.samples
    skipped = set(dataset.skipped)
    if skipped:
        warn_unreadable(sorted(skipped))
        samples = [s for s in samples if s.path not in skipped]
    return result, samples


def warn_unreadable(paths, reasons=()):
    """The warning for images left out because they did not decode (labelled datasets and --images alike):
    how many, the first ten paths, and why each of those failed where `reasons` (in path order) is given."""
    print(f"warning: {len(paths)} unreadable image(s) left out: {', '.join(paths[:10])}"
          f"{' ...' if len(paths) > 10 else ''}", file=sys.stderr)
    if reasons:
        print("\n".join(f"  {path}: {reason}" for path, reason in zip(paths[:10], reasons)), file=sys.stderr)


# ----------------------------------------------------------------------------- 4. command line
# Outputs (in --out, default: beside the checkpoint, eval_<dataset>_<split>/): metrics.json and
# predictions.csv (path, age, predicted_age, uncertainty, lower, upper; for --images: path, face, x0, y0,
# x1, y1, predicted_age, uncertainty, lower, upper), both written atomically; the table is printed.
# A trained run's evaluation is checked against the run: its dataset fingerprint (a changed dataset is
# refused unless --allow-data-change) and its training split (a --fold, --protocol, --seed or dataset whose
# val/test images were trained on is refused); protocol, fold and seed are printed. Unreadable images are
# left out and counted, as in train.py's own evaluation.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="a train.py checkpoint (RUN/best.pt); its dataset and split are the defaults")
    p.add_argument("--zero-shot", action="store_true", help="raw CLIP prompt classification (needs --clip)")
    p.add_argument("--summarize", nargs="+", metavar="PATH", help="instead of evaluating: mean +- std over "
                   "evaluations (one per split) of MAE and CS(5) per test set, and both over all their images; each "
                   "PATH an evaluation's folder (its metrics.json) or a run folder (its eval_*/metrics.json); "
                   "writes summary.json to --out")
    p.add_argument("--clip", help="CLIP checkpoint for --zero-shot (OpenAI's .pt, an open_clip file, a Hugging Face "
                   "CLIP folder)")
    add_clip_options(p)
    p.add_argument("--dataset", choices=sorted(data.DATASETS), help="dataset (default: the run's)")
    p.add_argument("--data-root", help="dataset folder (default: the run's)")
    p.add_argument("--split", default=None, choices=data.SPLITS, help="split to evaluate (default: test; val: the "
                   "half of the validation subjects the checkpoint was chosen on, calibration: the other half)")
    p.add_argument("--protocol", help="split protocol, e.g. random|subject5fold (default: the run's)")
    p.add_argument("--fold", "--split-index", type=non_negative_int, help="cross-validation fold; facebase: the "
                   "benchmark's split index (default: the run's)")
    p.add_argument("--database", nargs="+", metavar="FILE.json", help="facebase: the benchmark's database file(s); "
                   "several, or another database than the run's, with --split all: cross-dataset testing "
                   "(default: the run's)")
    p.add_argument("--seed", type=non_negative_int, help="seed of the split (default: the run's); a seed whose "
                   "test split overlaps the run's training images is refused")
    p.add_argument("--allow-data-change", action="store_true", help="evaluate although the run's dataset "
                   "changed since training (its fingerprint differs); recorded in metrics.json")
    p.add_argument("--age-target", choices=["apparent", "real"], help="appa-real: which age (default: the run's)")
    p.add_argument("--images", nargs="+", metavar="FILE_OR_DIR", help="predict ages for these images "
                   "(files or folders, no labels needed) instead of a dataset")
    p.add_argument("--out", help="output folder (default: beside the checkpoint, eval_<dataset>_<split>; "
                   "--summarize: the folder that holds every PATH)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loading processes")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--amp", default=None, choices=["auto", *AMP_DTYPES], help="autocast dtype; default: the "
                   "run's own --amp (auto for --zero-shot: bf16 on GPUs that have it, fp16 on older ones, off "
                   "on the CPU)")
    p.add_argument("--plot", action="store_true", help="also write cs_curve.png and scatter.png (matplotlib)")
    p.add_argument("--interval", type=coverage_level, default=0.9, help="coverage level of the conformal age "
                   "interval (lower, upper); train.py calibrates 0.8, 0.9 and 0.95")
    p.add_argument("--calibrate-on", choices=["calibration"], help="calibrate u and the interval on the run's "
                   "calibration split (half of its validation subjects, never selected on) now: a checkpoint from "
                   "before train.py stored a calibration, another --interval, or --tta")
    p.add_argument("--detect-faces", action="store_true", help="with --images: find the faces in each photo "
                   "(MTCNN, pip install -e \".[faces]\") and predict one age per face")
    p.add_argument("--face-margin", type=face_margin, default=None, help="with --detect-faces: margin of the "
                   f"aligned face crop, a fraction of the box on each side, 0 to {MAX_FACE_MARGIN:g}; default: the "
                   f"run's --crop-margin, else {data.ALIGN_MARGIN} (the benchmark's)")
    p.add_argument("--tta", default="none", choices=TTA_MODES, help="test-time augmentation: flip averages the "
                   "predictions (age and uncertainty) for each image and its mirror image; recorded in metrics.json")
    args = p.parse_args(argv)
    if sum((bool(args.ckpt), args.zero_shot, bool(args.summarize))) != 1:
        p.error("give exactly one of --ckpt RUN/best.pt, --zero-shot --clip CHECKPOINT or --summarize PATH ...")
    if args.zero_shot and not args.clip:
        p.error("--zero-shot needs --clip CHECKPOINT (e.g. ViT-B-16.pt)")
    if args.detect_faces and not args.images:
        p.error("--detect-faces works on photos given with --images")
    return args


def main(argv=None):
    one_line_warnings()
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.out)
    if args.plot:
        import_pyplot()   # a missing matplotlib is reported before any work
    device = select_device(args.device)
    configure_device(device)
    detect = face_detector(device) if args.detect_faces else None   # so is a missing detector
    if args.zero_shot:
        clip_model = load_clip(args)
        try:
            check_prompts_fit(CILFConfig(), clip_model.context_length)
        except ValueError as e:
            raise SystemExit(f"--clip {args.clip}: {e}") from None
        ckpt, model, train_config, source = None, CILFCIAE(clip_model, CILFConfig()), {}, Path(args.clip)
    else:
        ckpt = exit_on_checkpoint_error(load_checkpoint, args.ckpt)
        model, train_config, source = exit_on_checkpoint_error(model_from_checkpoint, ckpt, args.ckpt), \
            ckpt["config"]["train"], Path(args.ckpt)
    args.amp = args.amp or train_config.get("amp", "auto")   # evaluated as it was trained, unless told
    model = model.to(device).eval()
    calibration = ckpt.get("calibration") if ckpt else None
    if args.calibrate_on:
        dataset, name, _ = labelled_dataset(args, ckpt, train_config, "calibration", model)
        result, _ = predict_dataset(model, dataset, args, device, args.zero_shot, args.tta)
        if not len(result["age"]):
            raise SystemExit(f"--calibrate-on calibration: the calibration split of {name} holds no readable image")
        calibration = calibrate(result["age"], result["target"], result["uncertainty"], f"{name} calibration",
                                levels=sorted({*CONFORMAL_LEVELS, args.interval}))
    calibration = calibration_for(args.interval, calibration, "--calibrate-on" if args.calibrate_on else source)
    if calibration is None:
        print(f"note: no age interval, u not in calibrated years: {source} holds no calibration; add "
              f"--calibrate-on calibration", file=sys.stderr)
    elif args.tta != "none" and not args.calibrate_on:
        print(f"note: the interval was calibrated without --tta {args.tta}; add --calibrate-on calibration to "
              f"calibrate it with", file=sys.stderr)
    if args.images:
        paths = image_paths(args.images)
        out_dir = Path(args.out) if args.out else source.parent / ("zeroshot_" if args.zero_shot else "eval_images")
        out_dir.mkdir(parents=True, exist_ok=True)
        margin = next(m for m in (args.face_margin, train_config.get("crop_margin"), data.ALIGN_MARGIN) if m is not None)
        rows, skipped = predict_files(model, paths, calibration, args.interval, detect, margin,
                                      args.batch_size, args.workers, args.zero_shot, args.tta, args.amp)
        write_csv(out_dir / "predictions.csv", PHOTO_COLUMNS, rows)
        if skipped:
            warn_unreadable([path for path, _ in skipped], [reason for _, reason in skipped])
        faces = f", {sum(row[1] != -1 for row in rows)} face(s)" if detect else ""
        print(f"{len(paths) - len(skipped)} image(s){faces}, {len(skipped)} unreadable skipped: "
              f"{len(rows)} rows written to {out_dir / 'predictions.csv'}")
        return None
    split = args.split or "test"
    dataset, name, record = labelled_dataset(args, ckpt, train_config, split, model)
    tag = f"{name}_{split}"
    out_dir = Path(args.out) if args.out else source.parent / (("zeroshot_" if args.zero_shot else "eval_") + tag)
    out_dir.mkdir(parents=True, exist_ok=True)
    result, samples = predict_dataset(model, dataset, args, device, args.zero_shot, args.tta)
    if not samples:
        raise SystemExit(f"none of the {len(dataset)} images of {tag} could be read")
    interval = None
    if calibration is not None:
        result["uncertainty"] = uncertainty_in_years(result["uncertainty"], calibration)
        interval = conformal_interval(result["age"], result["uncertainty"], calibration, args.interval)
    write_predictions(out_dir / "predictions.csv", [s.path for s in samples], result, interval)
    std = [s.age_std if s.age_std is not None else float("nan") for s in samples]
    metrics = compute_metrics(result["age"], result["target"], result["ages_per_step"], result["uncertainty"],
                              std)
    metrics.update(checkpoint=str(source), dataset=name, split=split,
                   mode="zero-shot" if args.zero_shot else "trained", tta=args.tta, unreadable=len(dataset.skipped),
                   uncertainty_scale=calibration.get("uncertainty_scale") if calibration else None, **record)
    if isinstance(model, CILFCIAE):   # a model with age prompts (not the ce-baseline)
        with torch.no_grad():
            metrics["prompt_age_order"] = prompt_age_order(model.text_embeddings(), model.ages)
    if calibration is not None:
        metrics["interval"] = interval_metrics(result["age"], result["target"], result["uncertainty"],
                                               calibration, args.interval)
        if calibration["source"] == f"{name} {split}":
            print(f"warning: the interval was calibrated on {calibration['source']}, these very images: its "
                  f"coverage on them is not a measurement of it (evaluate on test for that)", file=sys.stderr)
        elif calibration["source"] not in (f"{name} calibration", f"{name} val"):   # val: runs before the split
            print(f"warning: the interval was calibrated on {calibration['source']}; its coverage on {tag} is "
                  f"guaranteed only for images exchangeable with those (and not measured on them)",
                  file=sys.stderr)
    write_json(out_dir / "metrics.json", metrics)
    print(format_table(metrics, f"{metrics['mode']} {source} on {tag}"))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.csv'}")
    if args.plot:
        plot(metrics, result, out_dir)
        print(f"wrote {out_dir / 'cs_curve.png'}, {out_dir / 'scatter.png'}"
              + (f" and {out_dir / 'reliability.png'}" if "uncertainty_calibration" in metrics else ""))
    return metrics


def labelled_dataset(args, ckpt, train_config, split, model):
    """(dataset, name, record) of this evaluation at `split`, with the model's evaluation transform, once the
    run's data is found unchanged and without training images; record says what was used, for metrics.json."""
    name, root, fold, seed, options = dataset_and_split(args, train_config)
    resolution, transform = model.clip.visual.input_resolution, model_transform(model)
    if name == "synthetic":   # drawn at the size train.py draws them for this input resolution
        options.setdefault("image_size", data.synthetic_image_size(resolution))
    if name == "facebase":   # the centre of the aligned crop, as train.py evaluates
        options.setdefault("margin", data.ALIGN_MARGIN)
        options.setdefault("crop_size", data.aligned_crop_size(resolution, options["margin"]))
        transform = data.aligned_transform(resolution, False, model.clip.image_mean, model.clip.image_std)
        if ckpt and split == "all":
            refuse_training_database(train_config, options["database"])
    try:
        change = check_data_unchanged(ckpt, args, name, root, fold, seed, options) if ckpt else None
        dataset = data.build_dataset(name, root, split=split, fold=fold, seed=seed, drop_unreadable=True,
                                     transform=transform, **options)
    except (FileNotFoundError, ValueError) as e:   # data.DatasetError is a ValueError
        raise SystemExit(f"--dataset {name}: {e}") from None
    if ckpt:
        check_no_training_overlap(ckpt, name, split, dataset, fold, seed, options)
    print(f"evaluating {name} {split} split: {split_description(name, fold, seed, options)}")
    record = {"protocol": options.get("protocol", data.PROTOCOLS[name]), "fold": fold, "seed": seed,
              **({"data_change_allowed": change} if change else {})}
    return dataset, name, record


def dataset_and_split(args, train_config):
    """(name, root, fold, seed, options) of the dataset and split to evaluate: each from the command line,
    else the one the run used (its dataset options only when it is the run's dataset)."""
    name = args.dataset or train_config.get("dataset")
    if name is None:
        raise SystemExit("--dataset is needed (the checkpoint does not name one)")
    root = args.data_root if args.data_root is not None else train_config.get("data_root")
    if args.data_root is None and root is not None and not os.path.isabs(root):
        raise SystemExit(f"the checkpoint stores the relative --data-root {root!r} (runs before absolute paths "
                         f"were stored), which means another folder from here: give --data-root")
    options = dict(train_config.get("dataset_options", {})) if name == train_config.get("dataset") else {}
    if args.protocol is not None:
        options["protocol"] = args.protocol
    if args.age_target is not None:
        options["age_target"] = args.age_target
    if args.database is not None:
        options["database"] = [os.path.abspath(os.path.expanduser(path)) for path in args.database]
    fold = args.fold if args.fold is not None else train_config.get("fold", 0)
    seed = args.seed if args.seed is not None else train_config.get("seed", 0)
    return name, root, fold, seed, options


def refuse_training_database(train_config, databases):
    """Refuse --split all on a database the run trained on (same file, or the same contents): every entry
    would include the training images."""
    trained = train_config.get("database") or []
    for path in databases:
        if any(os.path.isfile(t) and os.path.isfile(path) and clip_loader.sha256(t) == clip_loader.sha256(path)
               for t in trained):
            raise SystemExit(f"refusing --split all on {path}: the run trained on this database; --split all is "
                             f"for the other databases (cross-dataset testing), --split test for its own")


def split_description(name, fold, seed, options):
    return f"protocol {options.get('protocol', data.PROTOCOLS[name])}, fold {fold}, seed {seed}"


def check_data_unchanged(ckpt, args, name, root, fold, seed, options):
    """Compare the run's dataset fingerprint (train.py stores it) with the data found now, when this
    evaluation reads the run's own dataset from the run's root. Returns None, or the change in words when
    --allow-data-change let it pass; refuses otherwise."""
    saved, train_config = ckpt["config"].get("data"), ckpt["config"]["train"]
    same_root = args.data_root is None or os.path.abspath(os.path.expanduser(args.data_root)) == train_config.get("data_root")
    same_database = options.get("database") == train_config.get("dataset_options", {}).get("database")
    if not saved or name == "synthetic" or name != train_config.get("dataset") or not same_root or not same_database:
        return None
    everything = data.build_dataset(name, root, split="all", fold=fold, seed=seed, **options)
    entries = data.index_entries(everything, "all")
    if data.fingerprint(entries) == saved["fingerprint"]:
        return None
    change = data.describe_change(ckpt.get("data_index", []), entries) or "the file list differs"
    if not args.allow_data_change:
        raise SystemExit(f"the dataset under {root} changed since this run was trained: {change}. Its splits "
                         f"(seeded from the file list) may now put training images in the test split. Restore the "
                         f"data, or pass --allow-data-change to evaluate anyway (recorded in metrics.json)")
    print(f"warning: --allow-data-change: the dataset changed since training: {change}", file=sys.stderr)
    return change


def check_no_training_overlap(ckpt, name, split, dataset, fold, seed, options):
    """Refuse a val/test evaluation that contains images of the run's training split (same file, or the
    same relative path and size under a copy of the run's dataset) or, on the run's own dataset, its
    training subjects: a --fold, --protocol, --seed or dataset that does not match the run."""
    train_config, index = ckpt["config"]["train"], ckpt.get("data_index")
    if split not in ("val", "test", *(("all",) if name == "facebase" else ())) or not index or name == "synthetic":
        return
    run_root = ckpt["config"].get("data", {}).get("root") or ""   # the folder (a CSV's folder), not the CSV
    trained = [e for e in index if e[5] == "train"]
    train_files = {os.path.realpath(os.path.join(run_root, e[0])) for e in trained}
    same_dataset = name == train_config.get("dataset")
    train_names = {(e[0], e[1]) for e in trained} if same_dataset else set()
    train_subjects = {e[4] for e in trained if e[4] is not None} if same_dataset else set()
    ours = data.index_entries(dataset, split)
    overlap = [s.path for s, e in zip(dataset.samples, ours)
               if os.path.realpath(s.path) in train_files or (e[0], e[1]) in train_names or e[4] in train_subjects]
    if overlap:
        run = split_description(train_config.get("dataset", name), train_config.get("fold", 0),
                                train_config.get("seed", 0), train_config.get("dataset_options", {}))
        raise SystemExit(f"refusing to evaluate: {len(overlap)} of the {len(ours)} {split} images are training "
                         f"images (or training subjects) of this run, e.g. {overlap[0]}. The run trained on "
                         f"{train_config.get('dataset')} with {run}; this evaluation asks for {name} with "
                         f"{split_description(name, fold, seed, options)}. Use the run's --fold/--protocol/--seed "
                         f"(the defaults), or --split train to look at training images on purpose.")


def calibration_for(level, calibration, where):
    """The checkpoint's (or --calibrate-on's) calibration if it holds `level`, else a clear error."""
    if calibration is not None and level_key(level) not in calibration["quantiles"]:
        raise SystemExit(f"--interval {level:g}: {where} is calibrated for levels "
                         f"{', '.join(calibration['quantiles'])} only; add --calibrate-on calibration for another")
    return calibration


def write_predictions(path, paths, result, interval=None):
    """predictions.csv of a dataset: one row per image, in loader order; interval = (lower, upper) or None."""
    lower, upper = interval if interval is not None else (np.full(len(paths), np.nan),) * 2
    write_csv(path, ["path", "age", "predicted_age", "uncertainty", "lower", "upper"],
              ([p, "" if math.isnan(age) else f"{age:g}", *map(csv_cell, values)]
               for p, age, *values in zip(paths, result["target"], result["age"], result["uncertainty"],
                                          lower, upper)))


def write_csv(path, header, rows):
    """A CSV file of the header and rows, written atomically (any file name)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, text.getvalue())


def csv_cell(value):
    """A number as a CSV cell: 4 decimals, empty for nan (no interval without a calibration)."""
    return "" if math.isnan(value) else f"{value:.4f}"


# --summarize: one line per test set (dataset and split, the benchmark database where metrics.json names
# one, and the test-time augmentation if any) over the evaluations given, e.g. the five splits' test evaluations. mean +- std (sample standard
# deviation, n - 1) weighs every evaluation alike, as papers report splits; "over all images" pools the
# images (sum of abs errors / number of images, from each evaluation's MAE and image count n), the figure a
# leave-one-subject-out protocol reports (FG-NET: 82 one-person test folds of 2-18 images each).

SUMMARY_FIELDS = {"mae": "a number", "n": "an image count", "cs": "CS(theta) with theta 5", "dataset": "a name",
                  "split": "a name"}


def metrics_files(paths):
    """The metrics.json files of PATHs, in the order given (each once): PATH/metrics.json, or PATH/eval_*/
    metrics.json for a run folder (sorted), or PATH itself if it is a metrics.json. Anything else is a
    one-line exit naming the PATH."""
    files = []
    for path in map(Path, paths):
        if path.is_file() and path.name == "metrics.json":
            found = [path]
        elif (path / "metrics.json").is_file():
            found = [path / "metrics.json"]
        else:
            evaluations = sorted(p for p in path.glob("eval_*") if p.is_dir()) if path.is_dir() else []
            missing = [str(p) for p in evaluations if not (p / "metrics.json").is_file()]
            if not evaluations or missing:
                where = (f"{missing[0]} holds no metrics.json" if missing else
                         f"{path} holds no metrics.json and no eval_* folder" if path.is_dir() else
                         f"{path} is not a folder" if os.path.lexists(path) else f"{path} does not exist")
                raise SystemExit(f"--summarize: {where} (give an evaluation's folder, written by eval.py, or a run "
                                 f"folder holding eval_* folders)")
            found = [p / "metrics.json" for p in evaluations]
        files += [f for f in found if f.resolve() not in {g.resolve() for g in files}]
    return files


def read_metrics(path):
    """The fields --summarize reads from an evaluation's metrics.json (SUMMARY_FIELDS, the database if any),
    or a one-line exit naming the file and what is wrong."""
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"--summarize: {path}: not readable as JSON ({clip_loader.error_line(e)})") from None
    checks = {"mae": lambda v: isinstance(v, (int, float)) and math.isfinite(v),
              "n": lambda v: isinstance(v, int) and v > 0,
              "cs": lambda v: isinstance(v, dict) and isinstance(v.get("5"), (int, float)) and 0 <= v["5"] <= 1,
              "dataset": lambda v: isinstance(v, str), "split": lambda v: isinstance(v, str)}
    bad = [f"{k} ({SUMMARY_FIELDS[k]})" for k, ok in checks.items()
           if not isinstance(metrics, dict) or isinstance(metrics.get(k), bool) or not ok(metrics.get(k))]
    if bad:
        raise SystemExit(f"--summarize: {path}: not an evaluation's metrics.json written by eval.py: missing or "
                         f"wrong {', '.join(bad)}")
    database = metrics.get("database")
    names = [database] if isinstance(database, str) else database if isinstance(database, list) else []
    tta = [f"tta {metrics['tta']}"] if metrics.get("tta", "none") != "none" else []   # another evaluation
    test_set = " ".join([metrics["dataset"], *(Path(str(d)).stem for d in names), metrics["split"], *tta])
    return {"path": str(path), "test_set": test_set, "n": metrics["n"], "mae": float(metrics["mae"]),
            "cs5": float(metrics["cs"]["5"])}


def summarize_metrics(records):
    """One dict per test set (in order of first appearance) over read_metrics records: evaluations, images,
    MAE and CS(5) mean and sample std over the evaluations (std None for one), and both over all images."""
    groups = {}
    for record in records:
        groups.setdefault(record["test_set"], []).append(record)
    summary = []
    for test_set, group in groups.items():
        mae_values, cs5, n = (np.array([r[k] for r in group], dtype=np.float64) for k in ("mae", "cs5", "n"))
        std = lambda v: float(v.std(ddof=1)) if len(v) > 1 else None
        summary.append({"test_set": test_set, "evaluations": len(group), "images": int(n.sum()),
                        "mae_mean": float(mae_values.mean()), "mae_std": std(mae_values),
                        "cs5_mean": float(cs5.mean()), "cs5_std": std(cs5),
                        "mae_over_images": float((mae_values * n).sum() / n.sum()),
                        "cs5_over_images": float((cs5 * n).sum() / n.sum()),
                        "paths": [r["path"] for r in group]})
    return summary


def format_summary(summary):
    """summarize_metrics' result as a plain-text table (CS in %)."""
    pm = lambda mean, std, scale: f"{scale * mean:.2f} ± {scale * std:.2f}" if std is not None else f"{scale * mean:.2f}"
    rows = [["test set", "evaluations", "images", "MAE mean ± std", "CS(5) % mean ± std", "MAE over all images",
             "CS(5) % over all images"]]
    rows += [[g["test_set"], str(g["evaluations"]), str(g["images"]), pm(g["mae_mean"], g["mae_std"], 1),
              pm(g["cs5_mean"], g["cs5_std"], 100), f"{g['mae_over_images']:.2f}", f"{100 * g['cs5_over_images']:.2f}"]
             for g in summary]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def summarize(paths, out=None):
    """--summarize: read the evaluations of PATHs, print the table and write summary.json (atomically) to
    out, by default the deepest folder that holds every PATH. Returns the summary."""
    files = metrics_files(paths)
    summary = summarize_metrics([read_metrics(f) for f in files])
    out_dir = Path(out) if out else Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
    if out_dir.is_file():   # a single metrics.json given: write beside it
        out_dir = out_dir.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "summary.json", {"test_sets": summary})
    print(format_summary(summary))
    print(f"{len(files)} evaluation(s); wrote {out_dir / 'summary.json'}")
    return summary


def import_pyplot():
    """matplotlib.pyplot (file output only), or a clear way to get it: it is an optional extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib  (or, in this repository, "
                         "pip install -e \".[plot]\")") from None
    return plt


def plot(metrics, result, out_dir):
    """cs_curve.png (CS(theta) against theta), scatter.png (predicted against true age) and, for a model with
    an uncertainty, reliability.png (mean |error| against mean u in quintiles of u)."""
    plt = import_pyplot()
    thetas = sorted(metrics["cs"])
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot(thetas, [100 * metrics["cs"][t] for t in thetas], marker="o")
    ax.set(xlabel="error tolerance theta (years)", ylabel="CS(theta) %", ylim=(0, 100),
           title=f"cumulative score, MAE {metrics['mae']:.2f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "cs_curve.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(result["target"], result["age"], s=6, alpha=0.5)
    lo, hi = float(np.min(result["target"])), float(np.max(result["target"]))
    ax.plot([lo, hi], [lo, hi], color="k", linewidth=1)
    ax.set(xlabel="true age", ylabel="predicted age", title="predicted vs true")
    fig.tight_layout()
    fig.savefig(out_dir / "scatter.png", dpi=120)
    plt.close(fig)
    if "uncertainty_calibration" in metrics:
        bins = metrics["uncertainty_calibration"]["bins"]
        u, error = [b["mean_uncertainty"] for b in bins], [b["mean_abs_error"] for b in bins]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(u, error, marker="o")
        top = max(u + error)
        ax.plot([0, top], [0, top], color="k", linewidth=1)   # a calibrated u lies on the diagonal
        ax.set(xlabel="mean uncertainty u (years)", ylabel="mean |error| (years)",
               title=f"reliability, quintiles of u; mean u / MAE "
                     f"{metrics['uncertainty_calibration']['mean_uncertainty_over_mae']:.2f}")
        fig.tight_layout()
        fig.savefig(out_dir / "reliability.png", dpi=120)
        plt.close(fig)


# ----------------------------------------------------------------------------- 5. photos
# --images and the predict API: image files, the faces in them, their predictions.csv, and
# load_model / predict_images for other code.

# ----------------------------------------------------------------------------- 5.1 image files

def image_paths(items):
    """Files given directly, plus every image file under each directory given (sorted). FIFOs, devices
    and macOS "._x.jpg" metadata files are skipped with a reason (opening a FIFO would block forever)."""
    paths, skipped = [], []
    for item in map(Path, items):
        if item.is_dir():
            for p in sorted(p for p in item.rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS):
                if p.name.startswith("._"):
                    skipped.append(f"{p} (a macOS metadata file)")
                elif p.is_file():
                    paths.append(p)
                elif not p.is_dir():
                    skipped.append(f"{p} (not a regular file)")
        elif item.is_file():
            paths.append(item)
        elif os.path.lexists(item):
            skipped.append(f"{item} (not a regular file)")
        else:
            raise SystemExit(f"--images: {item} does not exist")
    if skipped:
        print(f"--images: skipped {len(skipped)} file(s): " + ", ".join(skipped[:5])
              + (" ..." if len(skipped) > 5 else ""), file=sys.stderr)
    if not paths:
        raise SystemExit(f"--images: no image files ({', '.join(data.IMAGE_EXTENSIONS)}) in {' '.join(items)}")
    return [str(p) for p in paths]


class ImageFiles(torch.utils.data.Dataset):
    """Unlabelled image files for --images: (path, image, its (width, height), why it did not decode). Each
    file is decoded and guarded (data.load_image, as the labelled datasets are) and, given a transform,
    transformed as it is read: the image is then the model's input tensor, and no decoded photo waits in a
    batch. On a file that does not decode: (path, None, None, "Type: message")."""

    def __init__(self, paths, transform=None):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = data.load_image(self.paths[i])
        except Exception as e:   # PIL raises many types on corrupt data
            return self.paths[i], None, None, f"{type(e).__name__}: {e}"
        return self.paths[i], self.transform(image) if self.transform else image, image.size, ""


# ----------------------------------------------------------------------------- 5.2 faces in raw photos
# The model is trained on face crops; a whole photo is not one. --detect-faces finds faces with MTCNN
# (Zhang et al. 2016; facenet-pytorch's port, MIT licence, its ~2 MB of weights inside the wheel, so it
# works offline; data.face_detector) and crops each one the way the benchmark's databases are cropped: the
# oriented box from its eyes and mouth (data.aligned_box), warped with the run's margin to the model's
# input enlarged by it, then its centre, as train.py evaluates. MTCNN was chosen over OpenCV's Haar cascade
# by measurement (bench/README.md#prediction-on-photos): it also finds a face turned aside, and its
# probability filters the false positives.

def face_detector(device="cpu"):
    """A function PIL image -> [data.Face, ...] (box, landmarks, probability), left to right, keeping faces
    of probability >= data.FACE_MIN_PROBABILITY; a missing facenet-pytorch is a one-line error naming the
    install command."""
    return data.face_detector(device)


def face_crop(image, face, resolution, margin=data.ALIGN_MARGIN):
    """The model's view of a face (data.Face) in a photo: data.crop_aligned of its aligned box at
    data.aligned_crop_size(resolution, margin), then the centre resolution x resolution, as train.py
    evaluates the benchmark's faces. margin: at most MAX_FACE_MARGIN, so the crop stays a bounded multiple
    of the face."""
    if not 0 <= margin <= MAX_FACE_MARGIN:
        raise ValueError(f"face margin {margin} outside [0, {MAX_FACE_MARGIN:g}]")
    crop = data.crop_aligned(image, face.aligned_box(), data.aligned_crop_size(resolution, margin), margin)
    return T.CenterCrop(resolution)(crop)


# ----------------------------------------------------------------------------- 5.3 predictions.csv of photos

PHOTO_COLUMNS = ["path", "face", "x0", "y0", "x1", "y1", "predicted_age", "uncertainty", "lower", "upper"]


def predict_files(model, paths, calibration, level, detect=None, margin=data.ALIGN_MARGIN, batch_size=64,
                  workers=0, zero_shot=False, tta="none", amp="auto"):
    """predictions.csv rows (PHOTO_COLUMNS) for image files, and the [(path, reason)] that did not decode.
    With detect (face_detector), one row per face (its detector box, its face_crop with `margin`), and one
    row with face -1 and an empty box for a photo without a face; without, one row per file, the box the
    whole image. Photos are read one at a time and turned into the model's input tensors at once (their
    face crops, or the whole image), so memory holds one decoded photo per loading process whatever their
    size. tta: see predict; amp: an --amp value."""
    transform, resolution = model_transform(model), model.clip.visual.input_resolution
    loader = torch.utils.data.DataLoader(ImageFiles(paths, None if detect else transform), batch_size=None,
                                         num_workers=workers)
    rows, skipped, faces = [], [], []   # faces: (path, face index, box, input tensor) waiting for a batch
    for path, image, size, error in loader:
        if image is None:
            skipped.append((path, error))
            continue
        if detect:
            found = [(path, j, face.box, transform(face_crop(image, face, resolution, margin)))
                     for j, face in enumerate(detect(image))]
        else:
            found = [(path, 0, (0, 0, *size), image)]
        faces += found or [(path, -1, None, None)]
        if sum(face[3] is not None for face in faces) >= batch_size:
            rows += face_rows(model, faces, calibration, level, batch_size, zero_shot, tta, amp)
            faces = []
    return rows + face_rows(model, faces, calibration, level, batch_size, zero_shot, tta, amp), skipped


def face_rows(model, faces, calibration, level, batch_size, zero_shot, tta, amp):
    """predictions.csv rows of (path, face index, box, input tensor or None for a photo without a face)."""
    inputs = [face[3] for face in faces if face[3] is not None]
    pred = (prediction(model, inputs, lambda x: x, calibration, level, batch_size, zero_shot, tta, amp)
            if inputs else None)
    values = zip(pred.age, pred.uncertainty, pred.lower, pred.upper) if inputs else iter(())
    return [[path, -1] + [""] * (len(PHOTO_COLUMNS) - 2) if x is None else
            [path, j, *(f"{v:.1f}" for v in box), *map(csv_cell, next(values))] for path, j, box, x in faces]


# ----------------------------------------------------------------------------- 5.4 the predict API

@dataclass
class Prediction:
    """What predict_images says about N images, as numpy arrays of shape (N,): the age, the model's own
    uncertainty (its predicted |error| in years, calibrated on held-out images when a calibration is
    given) and the conformal interval (nan without a calibration).

    u rates the error on images like the training data (faces, aligned and sized as in training). It is no
    detector of what is not such an image: a picture of noise or of no face gets an age and a u like a
    face's, often a confident one (bench/README.md#uncertainty). Give face crops, or let eval.py
    --images --detect-faces find the faces (photos without one are left out)."""
    age: np.ndarray
    uncertainty: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def load_model(path, device="cpu"):
    """(model, calibration) from a train.py checkpoint: its model (CILFCIAE, or LinearAgeBaseline for a
    --method ce-baseline run) in eval mode on `device`, and the conformal calibration train.py stored in it
    (None for a checkpoint written before there was one).
    A missing, unreadable or foreign file raises clip_loader.CheckpointError (a ValueError) naming it."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path).to(device).eval(), ckpt.get("calibration")


def predict_images(model, images, calibration=None, level=0.9, batch_size=64, zero_shot=False, tta="none",
                   amp="auto"):
    """Ages for PIL images (a list, or one image): the model's evaluation preprocessing (resize, centre
    crop, CLIP normalisation), batched on the model's device, under the autocast of `amp` (an --amp value).
    `calibration` (from load_model) gives the conformal interval at `level`; give face crops (face_crop),
    as the model was trained on faces. tta: "flip" averages each image's and its mirror's predictions
    (predict). An image beyond the datasets' size guard (data.check_image_size: aspect ratio, pixels), or a
    level the calibration does not hold, is a ValueError before any work."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    for i, image in enumerate(images):
        try:
            data.check_image_size(image)
        except ValueError as e:
            raise ValueError(f"image {i} of the {len(images)} given: {e}") from None
    if calibration is not None:
        level_quantiles(calibration, level)
    return prediction(model, images, model_transform(model), calibration, level, batch_size, zero_shot, tta, amp)


def prediction(model, items, prepare, calibration, level, batch_size, zero_shot, tta="none", amp="auto"):
    """The Prediction for items, each turned into the model's input tensor by prepare as its batch is formed."""
    device = next(model.parameters()).device
    batches = ((torch.stack([prepare(x) for x in chunk]), torch.full((len(chunk),), float("nan")))
               for chunk in (items[i:i + batch_size] for i in range(0, len(items), batch_size)))
    result = predict(model, batches, device, amp_option_dtype(amp, device), zero_shot, tta)
    if calibration is None:
        lower = upper = np.full(len(items), np.nan)
    else:
        result["uncertainty"] = uncertainty_in_years(result["uncertainty"], calibration)
        lower, upper = conformal_interval(result["age"], result["uncertainty"], calibration, level)
    return Prediction(age=result["age"], uncertainty=result["uncertainty"], lower=lower, upper=upper)


# ----------------------------------------------------------------------------- 6. shared with train.py
# The plumbing train.py imports from here as well: option types, atomic files, devices and autocast,
# checkpoint loading, the CLIP options.

# ----------------------------------------------------------------------------- 6.1 option values
# argparse types shared by train.py and eval.py: a bad value is a one-line usage error naming the option,
# never a traceback or a run that silently does something else (a negative learning rate, NaN clipping).

def _parse_finite(kind, text):
    """text read as kind (int or float); not a number, or not finite, is the one-line argparse error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _bounded(kind, within, says):
    """An argparse type: the text read as `kind` (finite), accepted when within(value), else the one-line
    error "must <says>, not <text>"."""
    def parse(text):
        value = _parse_finite(kind, text)
        if not within(value):
            raise argparse.ArgumentTypeError(f"must {says}, not {text}")
        return value
    parse.kind = kind   # what a value saved from the option is (checkpoint_problem checks saved values)
    return parse


positive_int = _bounded(int, lambda v: v > 0, "be a positive integer")
non_negative_int = _bounded(int, lambda v: v >= 0, "be an integer >= 0")
positive_float = _bounded(float, lambda v: v > 0, "be a finite number > 0")
non_negative_float = _bounded(float, lambda v: v >= 0, "be a finite number >= 0")
fraction = _bounded(float, lambda v: 0 <= v <= 1, "lie in [0, 1]")
probability_below_one = _bounded(float, lambda v: 0 <= v < 1, "lie in [0, 1)")
coverage_level = _bounded(float, lambda v: 0 < v < 1, "lie strictly between 0 and 1")
# --feedback-steps: each step is one more pass of the feedback per image (model.MAX_FEEDBACK_STEPS)
feedback_step_count = _bounded(int, lambda v: 0 <= v <= MAX_FEEDBACK_STEPS,
                               f"be an integer from 0 to {MAX_FEEDBACK_STEPS}")
# The crop around a face is (1 + 2 margin) times its side: a bounded multiple of the face, whatever the photo.
MAX_FACE_MARGIN = 1.0
face_margin = _bounded(float, lambda v: 0 <= v <= MAX_FACE_MARGIN, f"lie in [0, {MAX_FACE_MARGIN:g}]")


def device_name(text):
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return text


device_name.kind = str


# A CLIP reads 77 tokens, a few hundred characters; a longer template cannot fit any context, and one prompt
# per age class is made of it.
MAX_TEMPLATE_CHARS = 1000


def prompt_template(text):
    """A template with exactly one '{}' (the age) and no other braces (no format spec): one distinct prompt
    per class; at most MAX_TEMPLATE_CHARS characters."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise argparse.ArgumentTypeError(f"a template of {len(text)} characters is longer than any CLIP context "
                                         f"(at most {MAX_TEMPLATE_CHARS})")
    if text.count("{}") != 1 or text.replace("{}", "").count("{") or text.replace("{}", "").count("}"):
        raise argparse.ArgumentTypeError(f"{text[:60]!r}{'...' if len(text) > 60 else ''} must hold exactly one "
                                         f"'{{}}' (where the age goes) and no other braces")
    return text


prompt_template.kind = str


def one_line_warnings():
    """Show warnings on the command line as one line each ("UserWarning: message"): Python's default
    format also echoes the source line that raised it, which says nothing to a user of the scripts."""
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}\n"


# ----------------------------------------------------------------------------- 6.2 atomic files

def atomic_write(path, write):
    """Write a file atomically: write(f) fills a temporary file in the same folder (binary), which is
    flushed, synced and renamed over path. A kill at any moment leaves the old file or the new one, never a
    torn one; a failure (disk full, ...) removes the temporary file and raises OSError naming path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if not isinstance(error, (OSError, RuntimeError)):   # torch.save reports a full disk as RuntimeError
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free on its file system"
        except OSError:
            free = ""
        raise OSError(f"could not write {path} ({reason}{free}); nothing was left half-written") from error
    if hasattr(os, "O_DIRECTORY"):   # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path, text):
    """atomic_write of text as UTF-8; file names that are not UTF-8 (read by Python as surrogate escapes)
    are written back as the bytes they were, so no name can make the write fail."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")   # ASCII: surrogates become \udcXX escapes


# ----------------------------------------------------------------------------- 6.3 devices

def select_device(name="auto"):
    """'auto' -> CUDA when available, else CPU; an explicit 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no usable CUDA GPU (use --device cpu)")
    return device


# --amp of train.py and eval.py: the autocast dtype by name ("auto": autocast_dtype's choice for the device).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def configure_device(device):
    """The numerics both train.py and eval.py set on a GPU, so that a model is evaluated as it was trained:
    TF32 matmuls (Ampere and later: near-free speed; the age prompts are encoded in full float32
    regardless, model.CILFCIAE.text_embeddings) and cuDNN's autotuning (the input size is fixed). The CPU is
    left as it is."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True


def amp_option_dtype(amp, device):
    """The autocast dtype of an --amp value on device: "auto" is autocast_dtype's choice, the others name one."""
    return autocast_dtype(device) if amp == "auto" else AMP_DTYPES[amp]


def autocast_dtype(device):
    """bf16 autocast on GPUs that support it, fp16 on older ones, None (plain fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, dtype):
    """An autocast context for dtype, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_to(tensor, device):
    """Copy to device; non-blocking from pinned memory to a GPU (a no-op flag on the CPU)."""
    return tensor.to(device, non_blocking=device.type == "cuda")


# ----------------------------------------------------------------------------- 6.4 checkpoints

def load_checkpoint(path):
    """clip_loader.safe_torch_load (torch.load(weights_only=True) behind checks of the file's zip records,
    pickle and tensors). Raises clip_loader.CheckpointError (a ValueError) with a one-line message that
    names the file and says what is wrong; the scripts' main functions turn it into an exit."""
    path = Path(path)
    if not path.is_file():
        kind = "is a folder, not a checkpoint file" if path.is_dir() else \
            "is not a regular file" if os.path.lexists(path) else "not found"
        raise clip_loader.CheckpointError(f"checkpoint {kind}: {path}")
    try:
        ckpt = clip_loader.safe_torch_load(path)
    except clip_loader.CheckpointError as e:   # truncated, hostile, not a torch file, or pickled code
        raise clip_loader.CheckpointError(str(e).replace(f"{path}: ", f"{path}: cannot be read: ", 1)) from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("config"), dict) and "model" in ckpt["config"]):
        keys = str(list(ckpt)[:5])[:200] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise clip_loader.CheckpointError(
            f"{path}: not a CILF-CIAE checkpoint written by train.py (expected keys 'model' and 'config'; found "
            f"{keys}). For a plain CLIP checkpoint use --zero-shot --clip.")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise clip_loader.CheckpointError(f"{path}: {problem[0]}: {problem[1]} (not as train.py writes it)")
    return ckpt


# What a train.py checkpoint may hold, field by field, checked by load_checkpoint before anything is built
# from it (a shared best.pt may come from anyone). A rule maps a value to why it is refused, or None. A field
# that a command-line option wrote takes that option's type (6.1): a saved value passes only what the option
# would have accepted. A new config field, or a new kind of model, is one more entry in these tables.

def _what(value):
    """A value read from a file, for a message: a number or a short text as it is, anything else by its type
    alone (a text or a list may be huge)."""
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and value.bit_length() < 64) \
            or (isinstance(value, str) and len(value) <= 40):
        return repr(value)
    return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else f"a {type(value).__name__}"


def _accepts(option_type):
    """The rule of a value saved from an option of this type (positive_int, prompt_template, ...)."""
    kind = option_type.kind
    def rule(value):
        wanted = (int, float) if kind is float else kind
        if isinstance(value, bool) or not isinstance(value, wanted) or (isinstance(value, int)
                                                                        and value.bit_length() > 64):
            wanted = "a number" if kind is float else "an integer" if kind is int else "text"
            return f"must be {wanted}, not {_what(value)}"
        try:
            option_type(value if kind is str else repr(value))
        except argparse.ArgumentTypeError as e:
            return str(e)
        return None
    return rule


def saved_option_problem(action, value):
    """Why value cannot be what the argparse action of an option stored, or None (train.py checks every saved
    option of a run it continues with this): a flag holds one of its two values; None only where the
    option's default is None (a default resolved later is a value again); otherwise the option's number of
    values (nargs: a list), each of its type (6.1; text where it has none) and among its choices."""
    if action.nargs == 0:   # store_true, store_const
        return None if any(value is v for v in (action.default, action.const)) else \
            f"must be {action.const!r} or {action.default!r}, not {_what(value)}"
    if value is None:
        return None if action.default is None else "must be a value, not None"
    rule = _accepts(action.type) if action.type else _of_type(str)
    one = lambda v: rule(v) or (None if action.choices is None or v in action.choices else
                                f"must be one of {', '.join(map(str, action.choices))}, not {_what(v)}")
    if action.nargs is None or action.nargs == "?":
        return one(value)
    if not isinstance(value, list) or (len(value) != action.nargs if isinstance(action.nargs, int)
                                       else action.nargs == "+" and not value):
        count = action.nargs if isinstance(action.nargs, int) else "one or more"
        return f"must be a list of {count} values, not {len(value) if isinstance(value, list) else _what(value)}"
    return next(filter(None, map(one, value)), None)


def _one_of(*choices):
    return lambda value: None if isinstance(value, str) and value in choices else \
        f"must be one of {', '.join(choices)}, not {_what(value)}"


def _of_type(*kinds):
    """A value of one of these types (bool is not an int here)."""
    names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    return lambda value: None if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds) \
        else f"must be {names}, not {_what(value)}"


_boolean = _of_type(bool)


def _plain(value):
    """Plain data, as JSON holds it (what vars(args) and the CLIP record are made of): never a tensor, which
    train.py's comparison of runs cannot compare."""
    if isinstance(value, (list, tuple)):
        return next(filter(None, map(_plain, value)), None)
    if isinstance(value, dict):
        return next(filter(None, (_plain(v) if isinstance(k, str) else "a key that is not text"
                                  for k, v in value.items())), None)
    return None if value is None or isinstance(value, (bool, int, float, str)) else \
        f"must be plain data, not {_what(value)}"


# CILFConfig's fields, each with the rule of the train.py option that sets it (age_step has no option)
MODEL_FIELDS = {
    "min_age": _accepts(non_negative_float), "max_age": _accepts(non_negative_float),
    "age_step": _accepts(positive_float), "prompt_template": _accepts(prompt_template),
    "mixer": _one_of(*MIXERS, "none"), "depth": _accepts(non_negative_int), "width": _accepts(positive_int),
    "heads": _accepts(positive_int), "mlp_ratio": _accepts(positive_float),
    "dropout": _accepts(probability_below_one), "cross_attention": _boolean,
    "text_embeddings": _one_of(*TEXT_EMBEDDINGS),
    "feedback_steps": _accepts(feedback_step_count), "feedback_hidden": _accepts(positive_int),
    "feedback_design": _one_of(*FEEDBACK_DESIGNS), "feedback_text": _boolean,
    "feedback_noise": _accepts(non_negative_float),
    "detach_inverse": _boolean, "uncertainty_loss": _one_of(*UNCERTAINTY_LOSSES),
    "freeze_image_tower": _boolean, "freeze_text_tower": _boolean, "clip_bn": _one_of("frozen", "train"),
    "sigma_y": _accepts(positive_float), "label_sigma": _one_of("fixed", "age-std"),
    "distribution_weight": _accepts(non_negative_float),
    "l1_weight": _accepts(non_negative_float), "contrastive_weight": _accepts(non_negative_float),
    "contrastive_sigma": _accepts(positive_float), "feedback_weight": _accepts(non_negative_float),
    "uncertainty_weight": _accepts(non_negative_float)}
# The run's options that eval.py reads (the others are only compared, by train.py's resume)
TRAIN_FIELDS = {"method": _one_of(*MODELS), "dataset": _one_of(*data.DATASETS), "data_root": _of_type(str, type(None)),
                "dataset_options": lambda value: _of_type(dict)(value) or _plain(value),
                "fold": _accepts(non_negative_int), "seed": _accepts(non_negative_int)}
DATA_FIELDS = {"fingerprint": _of_type(str), "images": _accepts(non_negative_int),
               "root": _of_type(str, type(None)), "changes": _of_type(list)}


def _quantiles_problem(quantiles):
    """The calibration's quantiles: {level key: {"normalised": q, "plain": q}}, each q >= 0 or inf (too few
    images for the level), at levels strictly between 0 and 1."""
    if not isinstance(quantiles, dict) or not quantiles:
        return f"must be a dict of levels, not {_what(quantiles)}"
    for key, q in quantiles.items():
        try:
            level = float(key) if isinstance(key, str) and len(key) < 20 else None
        except ValueError:
            level = None
        if level is None or not 0 < level < 1 or level_key(level) != key:
            return f"level {_what(key)} is not a coverage level between 0 and 1"
        if not (isinstance(q, dict) and set(q) == {"normalised", "plain"} and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in q.values())):
            return f"level {key}: must be {{normalised, plain}}, two numbers >= 0 (inf: too few images)"
    return None


CALIBRATION_FIELDS = {"source": _of_type(str), "n": _accepts(non_negative_int), "delta": _accepts(positive_float),
                      "uncertainty_scale": _accepts(positive_float), "quantiles": _quantiles_problem}


def _index_problem(index):
    """data_index: one [relative path, size, age, age_std, subject, split] per image, and its face box of 8
    numbers for the benchmark's databases (data.index_entries)."""
    if not isinstance(index, list):
        return f"must be a list, not {_what(index)}"
    number = (int, float)
    for i, e in enumerate(index):
        if not (isinstance(e, list) and len(e) in (6, 7) and isinstance(e[0], str) and isinstance(e[1], int)
                and isinstance(e[2], number) and isinstance(e[3], (*number, type(None)))
                and isinstance(e[4], (str, type(None))) and e[5] in data.SPLITS
                and (len(e) == 6 or isinstance(e[6], list) and len(e[6]) == 8
                     and all(isinstance(v, number) for v in e[6]))):
            return f"entry {i} is not [path, size, age, age_std, subject, split] and an optional box of 8 numbers"
    return None


def _fields_problem(where, fields, rules, others=None, required=()):
    """(where.field, why) for the first field of a dict that breaks its rule or is required and missing, or
    None. Fields without a rule are refused unless others (a rule for them) is given."""
    if not isinstance(fields, dict):
        return where, f"must be a dict, not {_what(fields)}"
    missing = [name for name in required if name not in fields]
    if missing:
        return f"{where}.{missing[0]}", "missing"
    for name, value in fields.items():
        rule = rules.get(name, others) if isinstance(name, str) else None
        if rule is None:
            shown = repr(name[:40]) if isinstance(name, str) else _what(name)
            return where, f"holds {shown}, not a field train.py writes"
        problem = rule(value)
        if problem:
            return f"{where}.{name}", problem
    return None


def checkpoint_problem(ckpt):
    """(field, why) for the first value of a train.py checkpoint (load_checkpoint's structure) that
    train.py cannot have written, or None. Every field's type and range (the tables above) and the rules
    across the model config's fields that train.py applies to its options (model.config_problem); the age
    classes and widths the model config states against the weights' shapes (model.weight_shapes) and its
    prompts against the CLIP's context, so no model is built from sizes the weights do not have; the CLIP
    record's settings against the CLIP weights (clip_loader.infer_config) and its mean and std."""
    state, config = ckpt["model"], ckpt["config"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return "model", "must map weight names to tensors"
    if "train" not in config:
        return "config.train", "missing"
    record = config.get("clip") or {}
    for where, fields, rules, others, required in (
            ("config.model", config["model"], MODEL_FIELDS, None, ()),
            ("config.train", config["train"], TRAIN_FIELDS, _plain, ()),
            ("config.clip", record, {"settings": _of_type(dict)}, _plain, ()),
            ("config.data", config.get("data") or {}, DATA_FIELDS, None,
             ("fingerprint",) if config.get("data") else ()),
            ("calibration", ckpt.get("calibration", {}), CALIBRATION_FIELDS, None,
             CALIBRATION_FIELDS if "calibration" in ckpt else ())):
        problem = _fields_problem(where, fields, rules, others, required)
        if problem:
            return problem
    problem = _index_problem(ckpt.get("data_index", []))
    if problem:
        return "data_index", problem
    model, config_class = config["model"], MODELS[config["train"].get("method", "cilf-ciae")][1]
    foreign = [name for name in model if name not in {f.name for f in dataclass_fields(config_class)}]
    if foreign:   # a ce-baseline's config holds the age classes and the towers' settings only
        return f"config.model.{foreign[0]}", f"is not a field of {config_class.__name__} (the run's --method)"
    method_config = config_from_dict(model, config_class)
    problem = config_problem(method_config, data.AGE_RANGE[1])
    if problem:
        return f"config.model.{problem[0]}", problem[1]
    clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    if clip_state.get("text_projection", torch.empty(0)).ndim != 2 or "positional_embedding" not in clip_state:
        return None   # not a CLIP's weights: model_from_checkpoint refuses them before building anything
    try:
        clip_loader.infer_config(clip_state, **record.get("settings", {}))
        clip_loader.check_normalisation(record.get("image_mean", clip_loader.CLIP_MEAN),
                                        record.get("image_std", clip_loader.CLIP_STD))
    except (TypeError, ValueError) as e:
        return "config.clip", str(e)
    try:
        shapes = weight_shapes(method_config, clip_state["text_projection"].shape[1])
    except ValueError as e:
        return "config.model.age_step", str(e)
    for key, shape in shapes.items():
        held = tuple(state[key].shape) if key in state else None
        if held != shape:
            return "config.model", f"its sizes make {key} of shape {shape}, but the weights hold {held or 'none'}"
    if not torch.allclose(state["ages"].double(), method_config.ages().double()):
        return "config.model", "its age classes are not the weights' ages"
    if isinstance(method_config, CILFConfig):   # the ce-baseline reads no prompts
        try:
            check_prompts_fit(method_config, clip_state["positional_embedding"].shape[0])
        except ValueError as e:
            return "config.model.prompt_template", str(e)
    return None


def exit_on_checkpoint_error(function, *args):
    """function(*args), with a clip_loader.CheckpointError turned into an exit with its one line: what the
    scripts do with a bad file, where a library caller would rather catch the error."""
    try:
        return function(*args)
    except clip_loader.CheckpointError as e:
        raise SystemExit(str(e)) from None


def config_from_dict(fields, config_class=CILFConfig):
    """config_class (CILFConfig, ...) from the plain dict saved by train.py (JSON turns tuples into lists:
    undo that)."""
    defaults = config_class()
    return config_class(**{k: tuple(v) if isinstance(getattr(defaults, k, None), tuple) else v
                           for k, v in fields.items()})


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild a run's model from a train.py checkpoint alone: CLIP's sizes are inferred from the shapes of
    the "clip." weights (clip_loader.build_model), what shapes cannot tell from the saved clip_record
    (checkpoints written before it existed: OpenAI's settings), the method's modules from the saved model
    config of its --method (model.MODELS; checkpoints written before --method existed: cilf-ciae).
    Raises clip_loader.CheckpointError when the weights do not make that model."""
    state = ckpt["model"]
    clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    if not clip_state:
        raise clip_loader.CheckpointError(f"{path}: its model has no 'clip.' weights; not a CILF-CIAE checkpoint")
    method = (ckpt["config"].get("train") or {}).get("method", "cilf-ciae")
    if method not in MODELS:
        raise clip_loader.CheckpointError(f"{path}: its run used --method {method!r}, which this code does not "
                                          f"know ({', '.join(MODELS)})")
    model_class, config_class = MODELS[method]
    record = ckpt["config"].get("clip") or {}
    try:
        clip_model = clip_loader.build_model(clip_state, **record.get("settings", {}))
        clip_model.image_mean = tuple(record.get("image_mean", clip_loader.CLIP_MEAN))
        clip_model.image_std = tuple(record.get("image_std", clip_loader.CLIP_STD))
        model = model_class(clip_model, config_from_dict(ckpt["config"]["model"], config_class))
        model.load_state_dict(state)
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
        raise clip_loader.CheckpointError(f"{path}: weights do not fit the CILF-CIAE model they describe "
                                          f"({clip_loader.error_line(e)})") from None
    return model.float().eval()


# ----------------------------------------------------------------------------- 6.5 CLIP options

def add_clip_options(p):
    """--clip and what a CLIP file may not tell (train.py and eval.py share these options)."""
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of official CLIP file "
                   "names (renamed or converted files)")
    p.add_argument("--clip-activation", choices=sorted(clip_loader.ACTIVATIONS), default=None,
                   help="MLP activation the CLIP weights were trained with (default: from the open_clip_config.json "
                   "or Hugging Face config.json beside --clip, else OpenAI's quick_gelu with a warning); open_clip's "
                   "laion2b/datacomp/commonpool weights need gelu")
    p.add_argument("--clip-vision-head-width", type=positive_int, default=None, help="channels per attention head of the "
                   "image tower (default: from the config beside --clip, else 64); ViT-H-14: 80, ViT-g-14: 88, "
                   "ViT-bigG-14: 104")
    p.add_argument("--clip-text-head-width", type=positive_int, default=None, help="channels per attention head of the "
                   "text tower (default: from the config beside --clip, else 64)")


def load_clip(args):
    """The CLIP of --clip with the --clip-* options; a bad file or option ends the program with one line."""
    try:
        clip_model, _ = clip_loader.load(args.clip, device="cpu", verify=not args.no_verify,
                                         activation=args.clip_activation,
                                         vision_head_width=args.clip_vision_head_width,
                                         text_head_width=args.clip_text_head_width)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--clip: {e}") from None
    return clip_model


def clip_record(clip_model):
    """What train.py saves of its CLIP beyond the weights, for model_from_checkpoint: the settings no
    state dict tells (activation, head widths, eps, pooling, image size) and the normalisation."""
    return {"settings": {k: getattr(clip_model.config, k) for k in clip_loader.SETTINGS},
            "image_mean": list(clip_model.image_mean), "image_std": list(clip_model.image_std)}


if __name__ == "__main__":
    main()
