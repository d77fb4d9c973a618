"""Evaluation of CILF-CIAE age estimators: the field's metrics, a trained model rebuilt from its checkpoint
alone, zero-shot CLIP, age intervals with guaranteed coverage, and predictions for any photos (faces found
first with --detect-faces), also from other code (load_model, predict_images).

Run:
    python eval.py --ckpt runs/demo/best.pt                      # the run's own dataset, test split
    python eval.py --ckpt RUN/best.pt --split val --out RUN/eval_val
    python eval.py --ckpt RUN/best.pt --dataset utkface --data-root /data/UTKFace --split test
    python eval.py --zero-shot --clip ViT-B-16.pt --dataset utkface --data-root /data/UTKFace
    python eval.py --ckpt RUN/best.pt --images photos/ face.jpg  # no labels: writes predictions.csv
    python eval.py --ckpt RUN/best.pt --plot                     # plus cs_curve.png, scatter.png (matplotlib)
    python eval.py --ckpt RUN/best.pt --images photos/ --detect-faces   # one row per face (the [faces] extra)
    python eval.py --ckpt RUN/best.pt --interval 0.95            # the 95% interval; --calibrate-on val: old runs

Sections:
    1. metrics                 mae, cumulative_score, epsilon_error, mae_per_decade, spearman, compute_metrics
    2. conformal intervals     calibrate, conformal_interval, interval_metrics
    3. prediction              predict, predict_dataset
    4. command line            parse_args, main, the checks against the run, the output files
    5. photos                  image files, faces, the predict API (load_model, predict_images)
    6. shared with train.py    option types, atomic files, devices, checkpoints, CLIP options
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clip_loader
import data
from model import CILFCIAE, CILFConfig

__all__ = [
    # 1. metrics, 2. conformal intervals, 3. prediction
    "mae", "cumulative_score", "epsilon_error", "mae_per_decade", "spearman", "prompt_age_order",
    "compute_metrics", "format_table", "CONFORMAL_LEVELS", "conformal_quantile", "conformal_scores", "calibrate",
    "conformal_interval", "interval_metrics", "model_transform", "predict", "predict_dataset",
    # 4. command line, 5. photos
    "main", "check_data_unchanged", "check_no_training_overlap", "write_predictions", "image_paths",
    "predict_files", "face_detector", "face_crop", "FACE_MARGIN", "Prediction", "load_model", "predict_images",
    # 6. shared with train.py
    "positive_int", "non_negative_int", "positive_float", "non_negative_float", "fraction",
    "probability_below_one", "coverage_level", "device_name", "prompt_template", "one_line_warnings",
    "atomic_write", "write_text", "write_json", "select_device", "AMP_DTYPES", "configure_device",
    "amp_option_dtype", "autocast_dtype", "autocast", "move_to",
    "load_checkpoint", "exit_on_checkpoint_error", "model_from_checkpoint", "add_clip_options", "load_clip",
    "clip_record",
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


# ----------------------------------------------------------------------------- 2. conformal intervals
# Split conformal prediction (Vovk et al. 2005; Lei et al. 2018), normalised by the model's own uncertainty
# u (the error feedback's predicted |error|, abstract claim 4). On n calibration images with scores
# s_i = |y_i - y_hat_i| / (u_i + delta), q = the ceil((n + 1)(1 - alpha))-th smallest s_i, the interval
# y_hat +- q (u + delta) holds the true age of a new image with probability >= 1 - alpha, whatever the
# model, provided the calibration and test images are exchangeable (same dataset, same protocol). The plain
# interval (u ignored, score |y - y_hat|) has the same guarantee and a constant width; the normalised one
# is narrower on average only where u ranks the error.

CONFORMAL_LEVELS = (0.8, 0.9, 0.95)   # stored in best.pt by train.py
# Years added to u: a model sure of itself (u -> 0) would otherwise get a zero-width interval from any
# small score, and a model without feedback (u = 0 everywhere) gets the plain interval scaled by 1/delta.
CONFORMAL_DELTA = 1.0


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
    """Split conformal calibration on labelled images the model was not trained or selected on (the
    validation split): per level, the quantile of the normalised score and of the plain |error|.
    Plain data (str, float), as stored in a checkpoint."""
    scores = conformal_scores(pred, target, uncertainty, delta)
    abs_error = np.abs(np.asarray(target, dtype=np.float64) - np.asarray(pred, dtype=np.float64))
    return {"source": source, "n": int(len(scores)), "delta": float(delta),
            "quantiles": {level_key(level): {"normalised": conformal_quantile(scores, level),
                                             "plain": conformal_quantile(abs_error, level)} for level in levels}}


def conformal_interval(pred, uncertainty, calibration, level, plain=False):
    """(lower, upper) numpy arrays: y_hat -+ q (u + delta), or y_hat -+ q_plain with plain=True."""
    pred = np.asarray(pred, dtype=np.float64)
    q = calibration["quantiles"][level_key(level)]
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


@torch.no_grad()
def predict(model, loader, device, amp_dtype=None, zero_shot=False):
    """Run model over loader (in order). Returns numpy arrays: age (N,), ages_per_step (N, R+1),
    uncertainty (N,), target (N,) (nan where the loader has no labels)."""
    model.eval()
    out = {"age": [], "ages_per_step": [], "uncertainty": [], "target": []}
    for batch in loader:
        if batch is None:   # every image of the batch was unreadable (data.collate_readable)
            continue
        images, target = batch
        with autocast(device, amp_dtype):
            result = (model.zero_shot if zero_shot else model)(move_to(images, device))
        out["age"].append(result.age.float().cpu())
        out["ages_per_step"].append(result.ages_per_step.float().cpu())
        out["uncertainty"].append(result.uncertainty.float().cpu())
        out["target"].append(target.float())
    if not out["age"]:
        return {k: np.zeros((0, 1) if k == "ages_per_step" else 0) for k in out}
    return {k: torch.cat(v).numpy().astype(np.float64) for k, v in out.items()}


def predict_dataset(model, dataset, args, device, zero_shot=False):
    """(predict's arrays, samples) of a drop_unreadable dataset: unreadable images are left out and
    counted, exactly as in train.py's evaluation (data.AgeDataset). Under args.amp's autocast."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=data.collate_readable)
    amp_dtype = amp_option_dtype(args.amp, device)
    result, samples = predict(model, loader, device, amp_dtype, zero_shot), dataset.samples
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
    p.add_argument("--clip", help="CLIP checkpoint for --zero-shot (OpenAI's .pt, an open_clip file, a Hugging Face "
                   "CLIP folder)")
    add_clip_options(p)
    p.add_argument("--dataset", choices=sorted(data.DATASETS), help="dataset (default: the run's)")
    p.add_argument("--data-root", help="dataset folder (default: the run's)")
    p.add_argument("--split", default=None, choices=["train", "val", "test", "all"],
                   help="split to evaluate (default: test)")
    p.add_argument("--protocol", help="split protocol, e.g. random|subject5fold (default: the run's)")
    p.add_argument("--fold", type=non_negative_int, help="cross-validation fold (default: the run's)")
    p.add_argument("--seed", type=non_negative_int, help="seed of the split (default: the run's); a seed whose "
                   "test split overlaps the run's training images is refused")
    p.add_argument("--allow-data-change", action="store_true", help="evaluate although the run's dataset "
                   "changed since training (its fingerprint differs); recorded in metrics.json")
    p.add_argument("--age-target", choices=["apparent", "real"], help="appa-real: which age (default: the run's)")
    p.add_argument("--images", nargs="+", metavar="FILE_OR_DIR", help="predict ages for these images "
                   "(files or folders, no labels needed) instead of a dataset")
    p.add_argument("--out", help="output folder (default: beside the checkpoint, eval_<dataset>_<split>)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loading processes")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--amp", default=None, choices=["auto", *AMP_DTYPES], help="autocast dtype; default: the "
                   "run's own --amp (auto for --zero-shot: bf16 on GPUs that have it, fp16 on older ones, off "
                   "on the CPU)")
    p.add_argument("--plot", action="store_true", help="also write cs_curve.png and scatter.png (matplotlib)")
    p.add_argument("--interval", type=coverage_level, default=0.9, help="coverage level of the conformal age "
                   "interval (lower, upper); train.py calibrates 0.8, 0.9 and 0.95")
    p.add_argument("--calibrate-on", choices=["val"], help="calibrate the interval on the run's validation "
                   "split now (a checkpoint from before train.py stored a calibration, or another --interval)")
    p.add_argument("--detect-faces", action="store_true", help="with --images: find the faces in each photo "
                   "(MTCNN, pip install -e \".[faces]\") and predict one age per face")
    p.add_argument("--face-margin", type=non_negative_float, default=FACE_MARGIN, help="with --detect-faces: "
                   "fraction of the face box added on each side of the square crop (APPA-REAL's crops: 0.4)")
    args = p.parse_args(argv)
    if args.zero_shot == bool(args.ckpt):
        p.error("give exactly one of --ckpt RUN/best.pt or --zero-shot --clip CHECKPOINT")
    if args.zero_shot and not args.clip:
        p.error("--zero-shot needs --clip CHECKPOINT (e.g. ViT-B-16.pt)")
    if args.detect_faces and not args.images:
        p.error("--detect-faces works on photos given with --images")
    return args


def main(argv=None):
    one_line_warnings()
    args = parse_args(argv)
    if args.plot:
        import_pyplot()   # a missing matplotlib is reported before any work
    device = select_device(args.device)
    configure_device(device)
    detect = face_detector(device) if args.detect_faces else None   # so is a missing detector
    if args.zero_shot:
        clip_model = load_clip(args)
        ckpt, model, train_config, source = None, CILFCIAE(clip_model, CILFConfig()), {}, Path(args.clip)
    else:
        ckpt = exit_on_checkpoint_error(load_checkpoint, args.ckpt)
        model, train_config, source = exit_on_checkpoint_error(model_from_checkpoint, ckpt, args.ckpt), \
            ckpt["config"]["train"], Path(args.ckpt)
    args.amp = args.amp or train_config.get("amp", "auto")   # evaluated as it was trained, unless told
    model = model.to(device).eval()
    transform = model_transform(model)
    calibration = ckpt.get("calibration") if ckpt else None
    if args.calibrate_on:
        dataset, name, _ = labelled_dataset(args, ckpt, train_config, "val", transform,
                                            model.clip.visual.input_resolution)
        result, _ = predict_dataset(model, dataset, args, device, args.zero_shot)
        calibration = calibrate(result["age"], result["target"], result["uncertainty"], f"{name} val",
                                levels=sorted({*CONFORMAL_LEVELS, args.interval}))
    calibration = calibration_for(args.interval, calibration, "--calibrate-on" if args.calibrate_on else source)
    if calibration is None:
        print(f"note: no age interval: {source} holds no conformal calibration; add --calibrate-on val",
              file=sys.stderr)
    if args.images:
        paths = image_paths(args.images)
        out_dir = Path(args.out) if args.out else source.parent / ("zeroshot_" if args.zero_shot else "eval_images")
        out_dir.mkdir(parents=True, exist_ok=True)
        rows, skipped = predict_files(model, paths, calibration, args.interval, detect, args.face_margin,
                                      args.batch_size, args.workers, args.zero_shot, args.amp)
        write_csv(out_dir / "predictions.csv", PHOTO_COLUMNS, rows)
        if skipped:
            warn_unreadable([path for path, _ in skipped], [reason for _, reason in skipped])
        faces = f", {sum(row[1] != -1 for row in rows)} face(s)" if detect else ""
        print(f"{len(paths) - len(skipped)} image(s){faces}, {len(skipped)} unreadable skipped: "
              f"{len(rows)} rows written to {out_dir / 'predictions.csv'}")
        return None
    split = args.split or "test"
    dataset, name, record = labelled_dataset(args, ckpt, train_config, split, transform,
                                             model.clip.visual.input_resolution)
    tag = f"{name}_{split}"
    out_dir = Path(args.out) if args.out else source.parent / (("zeroshot_" if args.zero_shot else "eval_") + tag)
    out_dir.mkdir(parents=True, exist_ok=True)
    result, samples = predict_dataset(model, dataset, args, device, args.zero_shot)
    if not samples:
        raise SystemExit(f"none of the {len(dataset)} images of {tag} could be read")
    interval = None
    if calibration is not None:
        interval = conformal_interval(result["age"], result["uncertainty"], calibration, args.interval)
    write_predictions(out_dir / "predictions.csv", [s.path for s in samples], result, interval)
    std = [s.age_std if s.age_std is not None else float("nan") for s in samples]
    metrics = compute_metrics(result["age"], result["target"], result["ages_per_step"], result["uncertainty"],
                              std)
    with torch.no_grad():
        order = prompt_age_order(model.text_embeddings(), model.ages)
    metrics.update(checkpoint=str(source), dataset=name, split=split,
                   mode="zero-shot" if args.zero_shot else "trained", unreadable=len(dataset.skipped),
                   prompt_age_order=order, **record)
    if calibration is not None:
        metrics["interval"] = interval_metrics(result["age"], result["target"], result["uncertainty"],
                                               calibration, args.interval)
        if calibration["source"] == f"{name} val" and split == "val":
            print(f"warning: the interval was calibrated on {calibration['source']}, these very images: its "
                  f"coverage on them is not a measurement of it (evaluate on test for that)", file=sys.stderr)
        elif calibration["source"] != f"{name} val":
            print(f"warning: the interval was calibrated on {calibration['source']}; its coverage on {tag} is "
                  f"guaranteed only for images exchangeable with those (and not measured on them)",
                  file=sys.stderr)
    write_json(out_dir / "metrics.json", metrics)
    print(format_table(metrics, f"{metrics['mode']} {source} on {tag}"))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.csv'}")
    if args.plot:
        plot(metrics, result, out_dir)
        print(f"wrote {out_dir / 'cs_curve.png'} and {out_dir / 'scatter.png'}")
    return metrics


def labelled_dataset(args, ckpt, train_config, split, transform, resolution):
    """(dataset, name, record) of this evaluation at `split`, with the evaluation transform, once the run's
    data is found unchanged and without training images; record says what was used, for metrics.json."""
    name, root, fold, seed, options = dataset_and_split(args, train_config)
    if name == "synthetic":   # drawn at the size train.py draws them for this input resolution
        options.setdefault("image_size", data.synthetic_image_size(resolution))
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
    fold = args.fold if args.fold is not None else train_config.get("fold", 0)
    seed = args.seed if args.seed is not None else train_config.get("seed", 0)
    return name, root, fold, seed, options


def split_description(name, fold, seed, options):
    return f"protocol {options.get('protocol', data.PROTOCOLS[name])}, fold {fold}, seed {seed}"


def check_data_unchanged(ckpt, args, name, root, fold, seed, options):
    """Compare the run's dataset fingerprint (train.py stores it) with the data found now, when this
    evaluation reads the run's own dataset from the run's root. Returns None, or the change in words when
    --allow-data-change let it pass; refuses otherwise."""
    saved, train_config = ckpt["config"].get("data"), ckpt["config"]["train"]
    same_root = args.data_root is None or os.path.abspath(os.path.expanduser(args.data_root)) == train_config.get("data_root")
    if not saved or name == "synthetic" or name != train_config.get("dataset") or not same_root:
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
    if split not in ("val", "test") or not index or name == "synthetic":
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
                         f"{', '.join(calibration['quantiles'])} only; add --calibrate-on val for another")
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
    """cs_curve.png (CS(theta) against theta) and scatter.png (predicted against true age)."""
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
    """Unlabelled image files for --images: (path, RGB PIL image or None, why it did not decode)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.paths[i], data.load_image(self.paths[i]), ""
        except Exception as e:   # PIL raises many types on corrupt data
            return self.paths[i], None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- 5.2 faces in raw photos
# The model is trained on face crops; a whole photo is not one. --detect-faces finds faces with MTCNN
# (Zhang et al. 2016; facenet-pytorch's port, MIT licence, its ~2 MB of weights inside the wheel, so it
# works offline) and crops each one the way the datasets were cropped. Chosen over OpenCV's Haar cascade
# by measurement (bench/README.md#prediction-on-photos): it also finds a face turned aside, and its
# probability filters the false positives.

FACES_INSTALL = 'pip install "facenet-pytorch>=2.5,<2.6"  (or, in this repository, pip install -e ".[faces]")'
# Between the scores of the bundled photos' true faces and of their one false positive, a part of the
# motorcycle (bench/README.md#prediction-on-photos).
FACE_MIN_PROBABILITY = 0.95
# APPA-REAL's *_face.jpg crops add 40% of the face box on each side (yu4u/age-gender-estimation #71, the
# convention IMDB-WIKI crops follow too); a tighter margin than training's costs accuracy.
FACE_MARGIN = 0.4


def face_detector(device="cpu"):
    """A function PIL image -> [(x0, y0, x1, y1), ...] face boxes in pixels, left to right; a missing
    facenet-pytorch is a one-line error naming the install command."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise SystemExit(f"--detect-faces needs facenet-pytorch: {FACES_INSTALL}") from None
    mtcnn = MTCNN(keep_all=True, device=device)

    def detect(image):
        if min(image.size) < mtcnn.min_face_size:   # 2.5.x crashes on images smaller than its smallest face
            return []
        boxes, probs = mtcnn.detect(image)
        if boxes is None:
            return []
        return sorted(tuple(float(v) for v in box) for box, p in zip(boxes, probs) if p >= FACE_MIN_PROBABILITY)
    return detect


def face_crop(image, box, margin=FACE_MARGIN):
    """The square crop around a face box: centred on the box, side = (1 + 2 margin) x its longer side
    (margin = the fraction of the box added on each side); beyond the photo's border it is black."""
    x0, y0, x1, y1 = box
    side = round(max(x1 - x0, y1 - y0) * (1 + 2 * margin))
    left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
    return image.crop((left, top, left + side, top + side))


# ----------------------------------------------------------------------------- 5.3 predictions.csv of photos

PHOTO_COLUMNS = ["path", "face", "x0", "y0", "x1", "y1", "predicted_age", "uncertainty", "lower", "upper"]


def predict_files(model, paths, calibration, level, detect=None, margin=FACE_MARGIN, batch_size=64, workers=0,
                  zero_shot=False, amp="auto"):
    """predictions.csv rows (PHOTO_COLUMNS) for image files, and the [(path, reason)] that did not decode.
    With detect (face_detector), one row per face (its box, its face_crop), and one row with face -1 and
    an empty box for a photo without a face; without, one row per file, the box the whole image."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    rows, skipped = [], []
    for batch in loader:
        faces = []   # (path, face index, box, image to predict on), in file order
        for path, image, error in batch:
            if image is None:
                skipped.append((path, error))
                continue
            boxes = detect(image) if detect else [(0, 0, *image.size)]
            faces += [(path, j, box, face_crop(image, box, margin) if detect else image)
                      for j, box in enumerate(boxes)] or [(path, -1, None, None)]
        found = [face[3] for face in faces if face[3] is not None]
        pred = predict_images(model, found, calibration, level, batch_size, zero_shot, amp) if found else None
        values = zip(pred.age, pred.uncertainty, pred.lower, pred.upper) if found else iter(())
        for path, j, box, image in faces:
            if image is None:
                rows.append([path, -1] + [""] * (len(PHOTO_COLUMNS) - 2))
            else:
                rows.append([path, j, *(f"{v:.1f}" for v in box), *map(csv_cell, next(values))])
    return rows, skipped


# ----------------------------------------------------------------------------- 5.4 the predict API

@dataclass
class Prediction:
    """What predict_images says about N images, as numpy arrays of shape (N,): the age, the model's own
    uncertainty (its predicted |error|, years) and the conformal interval (nan without a calibration)."""
    age: np.ndarray
    uncertainty: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def load_model(path, device="cpu"):
    """(model, calibration) from a train.py checkpoint: the CILFCIAE model in eval mode on `device`, and
    the conformal calibration train.py stored in it (None for a checkpoint written before there was one).
    A missing, unreadable or foreign file raises clip_loader.CheckpointError (a ValueError) naming it."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path).to(device).eval(), ckpt.get("calibration")


def predict_images(model, images, calibration=None, level=0.9, batch_size=64, zero_shot=False, amp="auto"):
    """Ages for PIL images (a list, or one image): the model's evaluation preprocessing (resize, centre
    crop, CLIP normalisation), batched on the model's device, under the autocast of `amp` (an --amp value).
    `calibration` (from load_model) gives the conformal interval at `level`; give face crops (face_crop),
    as the model was trained on faces."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    device = next(model.parameters()).device
    transform = model_transform(model)
    batches = ((torch.stack([transform(im) for im in chunk]), torch.full((len(chunk),), float("nan")))
               for chunk in (images[i:i + batch_size] for i in range(0, len(images), batch_size)))
    result = predict(model, batches, device, amp_option_dtype(amp, device), zero_shot)
    if calibration is None:
        lower = upper = np.full(len(images), np.nan)
    else:
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
    return parse


positive_int = _bounded(int, lambda v: v > 0, "be a positive integer")
non_negative_int = _bounded(int, lambda v: v >= 0, "be an integer >= 0")
positive_float = _bounded(float, lambda v: v > 0, "be a finite number > 0")
non_negative_float = _bounded(float, lambda v: v >= 0, "be a finite number >= 0")
fraction = _bounded(float, lambda v: 0 <= v <= 1, "lie in [0, 1]")
probability_below_one = _bounded(float, lambda v: 0 <= v < 1, "lie in [0, 1)")
coverage_level = _bounded(float, lambda v: 0 < v < 1, "lie strictly between 0 and 1")


def device_name(text):
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return text


def prompt_template(text):
    """A template with exactly one '{}' (the age) and no other braces: one distinct prompt per class."""
    if text.count("{}") != 1 or text.replace("{}", "").count("{") or text.replace("{}", "").count("}"):
        raise argparse.ArgumentTypeError(f"{text!r} must hold exactly one '{{}}' (where the age goes) and no "
                                         f"other braces")
    return text


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
    return ckpt


def exit_on_checkpoint_error(function, *args):
    """function(*args), with a clip_loader.CheckpointError turned into an exit with its one line: what the
    scripts do with a bad file, where a library caller would rather catch the error."""
    try:
        return function(*args)
    except clip_loader.CheckpointError as e:
        raise SystemExit(str(e)) from None


def config_from_dict(fields):
    """CILFConfig from the plain dict saved by train.py (JSON turns tuples into lists: undo that)."""
    defaults = CILFConfig()
    return CILFConfig(**{k: tuple(v) if isinstance(getattr(defaults, k, None), tuple) else v
                         for k, v in fields.items()})


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild CILFCIAE from a train.py checkpoint alone: CLIP's sizes are inferred from the shapes of the
    "clip." weights (clip_loader.build_model), what shapes cannot tell from the saved clip_record
    (checkpoints written before it existed: OpenAI's settings), the method's modules from the CILFConfig.
    Raises clip_loader.CheckpointError when the weights do not make that model."""
    state = ckpt["model"]
    clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    if not clip_state:
        raise clip_loader.CheckpointError(f"{path}: its model has no 'clip.' weights; not a CILF-CIAE checkpoint")
    record = ckpt["config"].get("clip") or {}
    try:
        clip_model = clip_loader.build_model(clip_state, **record.get("settings", {}))
        clip_model.image_mean = tuple(record.get("image_mean", clip_loader.CLIP_MEAN))
        clip_model.image_std = tuple(record.get("image_std", clip_loader.CLIP_STD))
        model = CILFCIAE(clip_model, config_from_dict(ckpt["config"]["model"]))
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
