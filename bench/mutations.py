"""How strong is the test suite? Apply realistic one-line slips to a scratch copy of the repository, one at a
time, run the tests that should notice each one, and count how many turn red (the slip is "killed").

    python bench/mutations.py                      # every slip below; a table and the score
    python bench/mutations.py --only lr-compounds  # one slip (a name, or a part of names: --only feedback)
    python bench/mutations.py --list               # the slips and their tests, without running anything
    python bench/mutations.py --baseline           # first check that the named tests pass unmutated

Each slip is (name, file, exact original text, replacement, the pytest node ids that should kill it, where
it comes from). The working tree is never touched: it is copied (without .git, runs/, caches) to a
temporary folder, the slip is written there, the named tests run there (cwd = the copy, so its modules
are the ones imported), and the file is restored before the next slip. An original text that no longer
occurs exactly once in its file (the code moved on) is reported as "not found" / "ambiguous", not applied,
and left out of the score.

Killed = pytest exits with failures (1); exits 2-4 (a collection or internal error) count as killed but
are shown as "pytest error" (a slip that breaks the syntax tests nothing: check it); a test that hangs
past --timeout counts as killed too. Exit 5 (no tests collected: a renamed test) is "no tests", unscored.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "runs", "out", "__pycache__", ".pytest_cache", "*.egg-info",
                                 "build", "dist")

RUNS = "tests/test_slips_runs.py::"
CLIP = "tests/test_slips_clip_loader.py::"
MODEL = "tests/test_slips_model.py::"


@dataclass
class Slip:
    name: str
    file: str
    original: str
    replacement: str
    tests: list
    source: str = "own"


SLIPS = [
    # ---------------------------------------------------------------- review, class 1: evaluation practice
    Slip("checkpoint-on-test", "train.py",
         'val_mae = evaluate_mae(raw_model, splits["val"], args, device, amp_dtype, rank, world)',
         'val_mae = evaluate_mae(raw_model, splits["test"], args, device, amp_dtype, rank, world)',
         [RUNS + "test_best_pt_holds_the_epoch_of_lowest_validation_mae"], "review: evaluation practice"),
    Slip("resume-forgets-best-val", "train.py",
         'state.update(step=ckpt["step"], epoch=ckpt["epoch"], best_val_mae=ckpt["best_val_mae"],',
         'state.update(step=ckpt["step"], epoch=ckpt["epoch"],',
         [RUNS + "test_resumed_run_keeps_the_best_pt_of_the_epoch_before_the_stop"], "review: evaluation practice"),
    # ---------------------------------------------------------------- class 2: the rate the loop applies
    Slip("lr-compounds", "train.py",
         'group["lr"] = group["base_lr"] * factor',
         'group["lr"] = group["lr"] * factor',
         [RUNS + "test_each_step_applies_the_base_rate_times_the_schedule"], "review: learning rate"),
    # ---------------------------------------------------------------- class 3: eval.py
    Slip("overlap-ignores-subjects", "eval.py",
         "or (e[0], e[1]) in train_names or e[4] in train_subjects]",
         "or (e[0], e[1]) in train_names]",
         [RUNS + "test_eval_refuses_new_photos_of_a_training_subject"], "review: evaluation"),
    Slip("model-transform-default-normalisation", "eval.py",
         "return data.eval_transform(model.clip.visual.input_resolution, model.clip.image_mean, model.clip.image_std)",
         "return data.eval_transform(model.clip.visual.input_resolution)",
         [RUNS + "test_eval_uses_the_loaded_models_own_normalisation",
          RUNS + "test_predict_api_uses_the_loaded_models_own_normalisation"], "review: evaluation"),
    Slip("checkpoint-normalisation-not-restored", "eval.py",
         'clip_model.image_mean = tuple(record.get("image_mean", clip_loader.CLIP_MEAN))',
         "clip_model.image_mean = clip_loader.CLIP_MEAN",
         [RUNS + "test_eval_uses_the_loaded_models_own_normalisation",
          RUNS + "test_predict_api_uses_the_loaded_models_own_normalisation"], "review: evaluation"),
    Slip("interval-negative-u-not-floored", "eval.py",
         'half = q["normalised"] * (np.maximum(np.asarray(uncertainty, dtype=np.float64), 0.0)',
         'half = q["normalised"] * (np.asarray(uncertainty, dtype=np.float64)',
         [RUNS + "test_negative_uncertainty_counts_as_zero_in_the_interval"], "review: evaluation"),
    # ---------------------------------------------------------------- class 4: checkpoint formats
    Slip("hf-text-eps-from-vision", "clip_loader.py",
         '"text_ln_eps": text.get("layer_norm_eps", 1e-5)',
         '"text_ln_eps": vision.get("layer_norm_eps", 1e-5)',
         [CLIP + "test_hugging_face_towers_keep_their_own_layer_norm_eps"], "review: checkpoint formats"),
    Slip("text-pooled-at-argmax", "clip_loader.py",
         "end = text.argmax(dim=-1) if self.text_eos_id is None else (text == self.text_eos_id).int().argmax(dim=-1)",
         "end = text.argmax(dim=-1)",
         [CLIP + "test_hugging_face_text_is_read_at_the_end_of_text_id_not_the_largest_id"], "review: checkpoint formats"),
    Slip("hf-eos-id-default", "clip_loader.py",
         'text.get("eos_token_id", 49407)',
         'text.get("eos_token_id", 2)',
         [CLIP + "test_hugging_face_config_without_eos_token_id_pools_as_transformers_does"], "review: checkpoint formats"),
    Slip("open-clip-eos-id-default", "clip_loader.py",
         'if text.get("pool_type", "argmax") == "eos" and text.get("eos_id", 2) == 49407:',
         'if text.get("pool_type", "argmax") == "eos" and text.get("eos_id", 49407) == 49407:',
         [CLIP + "test_open_clip_eos_pooling_without_its_eos_id_is_refused"], "review: checkpoint formats"),
    # ---------------------------------------------------------------- class 5: hostile files
    Slip("allow-list-prefix-torch", "clip_loader.py",
         'module.startswith(("torch.", "__torch__."))',
         'module.startswith(("torch", "__torch__."))',
         [CLIP + "test_module_allow_list_is_torch_dot_not_the_letters_torch"], "review: hostile files"),
    Slip("allow-list-prefix-__torch__", "clip_loader.py",
         'module.startswith(("torch.", "__torch__."))',
         'module.startswith(("torch.", "__torch__"))',
         [CLIP + "test_module_allow_list_is_torch_dot_not_the_letters_torch"], "review: hostile files"),
    Slip("safetensors-header-not-bound-to-file", "clip_loader.py",
         "if n > min(size - 8, _MAX_SAFETENSORS_HEADER):",
         "if n > _MAX_SAFETENSORS_HEADER:",
         [CLIP + "test_safetensors_header_longer_than_the_file_is_refused"], "review: hostile files"),
    # ---------------------------------------------------------------- class 6: feedback
    Slip("feedback-next-from-unperturbed", "feedback.py",
         "y = y_in + residual",
         "y = y + residual",
         [MODEL + "test_training_corrects_the_perturbed_hypothesis_it_read"], "review: feedback"),
    Slip("feedback-step-index-not-clamped", "feedback.py",
         "min(step_index, self.steps)",
         "step_index",
         [MODEL + "test_more_steps_at_inference_than_trained_reuse_the_last_step"], "review: feedback"),
    Slip("feedback-frequencies-linear", "feedback.py",
         "(math.pi * 2.0 ** torch.arange(self.FREQUENCIES, device=y.device, dtype=y.dtype))",
         "(math.pi * (1.0 + torch.arange(self.FREQUENCIES, device=y.device, dtype=y.dtype)))",
         [MODEL + "test_hypothesis_encoding_frequencies_double"], "review: feedback"),
    # ---------------------------------------------------------------- review: the loss and accumulation
    Slip("contrastive-log-temperature", "model.py",
         "self.temperature(), c.contrastive_sigma)",
         "self.logit_scale, c.contrastive_sigma)",
         [MODEL + "test_contrastive_part_uses_the_temperature_of_the_age_logits"], "review: loss and accumulation"),
    Slip("accumulation-not-divided", "train.py",
         "scaler.scale(loss / group_size).backward()",
         "scaler.scale(loss).backward()",
         [RUNS + "test_two_micro_batches_of_4_give_the_gradients_of_one_batch_of_8"], "review: loss and accumulation"),
    Slip("accumulation-short-last-group", "train.py",
         "scaler.scale(loss / group_size).backward()",
         "scaler.scale(loss / args.accum_steps).backward()",
         [RUNS + "test_two_micro_batches_of_4_give_the_gradients_of_one_batch_of_8"], "review: loss and accumulation"),
    # ---------------------------------------------------------------- own slips across the modules
    Slip("label-distribution-sigma-not-squared", "model.py",
         "logq = -(ages[None, :] - target[:, None]) ** 2 / (2 * sigma ** 2)",
         "logq = -(ages[None, :] - target[:, None]) ** 2 / (2 * sigma)",
         ["tests/test_model.py::test_everything_off_is_a_clip_prompt_classifier_trained_with_the_distribution_loss"]),
    Slip("kl-mean-not-batchmean", "model.py",
         'label, reduction="batchmean")',
         'label, reduction="mean")',
         ["tests/test_model.py::test_everything_off_is_a_clip_prompt_classifier_trained_with_the_distribution_loss",
          "tests/test_model.py::test_a_zero_loss_weight_removes_exactly_its_part"]),
    Slip("l1-on-final-not-y0", "model.py",
         'parts["l1"] = (out.ages_per_step[:, 0] - y).abs().mean()',
         'parts["l1"] = (out.ages_per_step[:, -1] - y).abs().mean()',
         ["tests/test_model.py::test_y0_keeps_its_own_l1_with_and_without_feedback"]),
    Slip("soft-targets-normalised-by-column", "model.py",
         "return (-(y[:, None] - y[None, :]) ** 2 / (2 * sigma ** 2)).softmax(dim=1)",
         "return (-(y[:, None] - y[None, :]) ** 2 / (2 * sigma ** 2)).softmax(dim=0)",
         ["tests/test_model.py::test_soft_contrastive_targets_hand_computed_with_repeated_ages"]),
    Slip("predict-reports-y0", "model.py",
         "age = fb.ages[:, -1].clamp(self.ages[0], self.ages[-1])",
         "age = fb.ages[:, 0].clamp(self.ages[0], self.ages[-1])",
         ["tests/test_model.py::test_age_classes_reach_116_and_predictions_are_clipped_to_them",
          "tests/test_feedback.py::test_reread_feedback_corrects_a_biased_base_that_is_trained_with_it"]),
    Slip("feedback-loss-includes-y0", "feedback.py",
         'return {"feedback": error[:, 1:].mean(), "uncertainty": uncertainty}',
         'return {"feedback": error.mean(), "uncertainty": uncertainty}',
         ["tests/test_feedback.py::test_feedback_loss_hand_computed_and_uncertainty_target_detached"]),
    Slip("rating-input-not-detached", "feedback.py",
         "rating_in = torch.cat([evidence, residual.unsqueeze(1) / self.age_scale], dim=1).detach()",
         "rating_in = torch.cat([evidence, residual.unsqueeze(1) / self.age_scale], dim=1)",
         ["tests/test_feedback.py::test_uncertainty_loss_sends_no_gradient_into_the_fused_embedding"]),
    Slip("uncertainty-target-not-detached", "feedback.py",
         "rated_error = (rated - target).abs().detach()",
         "rated_error = (rated - target).abs()",
         ["tests/test_feedback.py::test_feedback_loss_hand_computed_and_uncertainty_target_detached"]),
    Slip("inverse-map-last-interval-open", "feedback.py",
         ".clamp(0, ages.numel() - 2)",
         ".clamp(0, ages.numel() - 1)",
         ["tests/test_feedback.py::test_inverse_map_exact_at_whole_ages_uneven_spacing",
          "tests/test_feedback.py::test_inverse_map_hand_computed_between_ages_and_clamped"]),
    Slip("linear-attention-feature-map-not-positive", "linear_attention.py",
         "return F.elu(x).add_(1)",
         "return F.elu(x)",
         ["tests/test_linear_attention.py::test_linear_matches_quadratic_definition"]),
    Slip("conformal-rank-without-finite-sample-correction", "eval.py",
         "rank = math.ceil((len(scores) + 1) * level - 1e-9)",
         "rank = math.ceil(len(scores) * level - 1e-9)",
         ["tests/test_predict.py::test_conformal_quantile_by_hand_with_ties_and_the_finite_sample_correction"]),
    Slip("cumulative-score-strict", "eval.py",
         "return {int(t): float((err <= t).mean()) for t in thetas}",
         "return {int(t): float((err < t).mean()) for t in thetas}",
         ["tests/test_eval.py::test_mae_and_cumulative_score_by_hand"]),
    Slip("warmup-off-by-one", "train.py",
         "return (step + 1) / warmup_steps",
         "return step / warmup_steps",
         ["tests/test_train.py::test_lr_factor_warmup_then_cosine",
          RUNS + "test_each_step_applies_the_base_rate_times_the_schedule"]),
    Slip("weight-decay-on-biases", "model.py",
         'return param.ndim >= 2 and "embedding" not in name',
         'return param.ndim >= 1 and "embedding" not in name',
         ["tests/test_model.py::test_param_groups"]),
    Slip("evaluation-shard-drops-last-image", "train.py",
         "shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))",
         "shard = torch.utils.data.Subset(dataset, range(rank, len(dataset) - 1, world))",
         [RUNS + "test_best_pt_holds_the_epoch_of_lowest_validation_mae"]),
    Slip("hf-qkv-order", "clip_loader.py",
         'torch.cat([parts["q"], parts["k"], parts["v"]])',
         'torch.cat([parts["q"], parts["v"], parts["k"]])',
         [CLIP + "test_hugging_face_text_is_read_at_the_end_of_text_id_not_the_largest_id"]),
    Slip("split-minimum-needs-four", "data.py",
         "if n >= 3:\n        n_val, n_test = max(n_val, 1), max(n_test, 1)",
         "if n > 3:\n        n_val, n_test = max(n_val, 1), max(n_test, 1)",
         ["tests/test_data.py::test_three_subjects_are_one_per_split"]),
    Slip("fold-validation-share-floored", "data.py",
         "n_val = max(1, round(len(others) * VAL_FRACTION)) if len(others) > 1 else 0",
         "n_val = max(1, int(len(others) * VAL_FRACTION)) if len(others) > 1 else 0",
         ["tests/test_data.py::test_morph2_protocols"]),
]


def apply(text, slip):
    """(new text, None) or (None, why it cannot be applied)."""
    count = text.count(slip.original)
    if count == 0:
        return None, "not found"
    if count > 1:
        return None, f"ambiguous ({count} matches)"
    return text.replace(slip.original, slip.replacement), None


def run_tests(copy, tests, python, timeout):
    """'killed', 'survived', 'no tests' or 'timeout' (counted as killed), and the seconds taken."""
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=copy,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    # 1: tests failed; 2-4: interrupted, internal or usage error (a slip that breaks the module's syntax
    # shows here: look at it, it is no test of the suite)
    outcome = {0: "survived", 1: "killed", 5: "no tests"}.get(done.returncode, "error")
    return outcome, time.time() - start, (done.stdout + done.stderr)[-3000:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", metavar="NAME", help="run the slips whose name contains NAME")
    p.add_argument("--list", action="store_true", help="list the slips and their tests, run nothing")
    p.add_argument("--baseline", action="store_true", help="first run every named test on the unmutated copy")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    p.add_argument("--timeout", type=float, default=600, help="seconds per slip before it counts as killed")
    p.add_argument("--verbose", action="store_true", help="print pytest's output tail for every survivor")
    args = p.parse_args(argv)
    slips = [s for s in SLIPS if args.only is None or args.only in s.name]
    if not slips:
        raise SystemExit(f"--only {args.only}: no slip's name contains it; --list shows them")
    if args.list:
        for s in slips:
            print(f"{s.name:48s} {s.source:11s} {s.file:18s} {' '.join(t.split('::')[-1] for t in s.tests)}")
        return None

    rows = []
    with tempfile.TemporaryDirectory(prefix="mutations_") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORED, symlinks=True)
        if args.baseline:
            tests = sorted({t for s in slips for t in s.tests})
            outcome, seconds, tail = run_tests(copy, tests, args.python, args.timeout)
            print(f"baseline ({len(tests)} tests, unmutated): {'pass' if outcome == 'survived' else outcome} "
                  f"({seconds:.0f}s)", flush=True)
            if outcome != "survived":
                print(tail)
                raise SystemExit("the named tests do not pass on the unmutated code: fix that first")
        for s in slips:
            path = copy / s.file
            if not path.exists():
                rows.append((s, "file not found", 0.0))
                continue
            original = path.read_text(encoding="utf-8")
            mutated, problem = apply(original, s)
            if problem:
                rows.append((s, problem, 0.0))
                print(f"{s.name}: {problem}", flush=True)
                continue
            path.write_text(mutated, encoding="utf-8")
            try:
                outcome, seconds, tail = run_tests(copy, s.tests, args.python, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            rows.append((s, outcome, seconds))
            print(f"{s.name}: {outcome} ({seconds:.0f}s)", flush=True)
            if args.verbose and outcome == "survived":
                print(tail)

    print()
    print("| slip | from | file | killed | seconds |")
    print("|---|---|---|---|---|")
    for s, outcome, seconds in rows:
        killed = {"killed": "yes", "timeout": "yes (timeout)", "survived": "no",
                  "error": "yes (pytest error)"}.get(outcome, outcome)
        print(f"| {s.name} | {s.source} | {s.file} | {killed} | {seconds:.0f} |")
    scored = [(s, o) for s, o, _ in rows if o in ("killed", "timeout", "error", "survived")]
    skipped = [s.name for s, o, _ in rows if o not in ("killed", "timeout", "error", "survived")]
    killed = sum(o != "survived" for _, o in scored)
    for group, keep in (("the review's slips", lambda s: s.source != "own"), ("own", lambda s: s.source == "own")):
        part = [(s, o) for s, o in scored if keep(s)]
        if part:
            print(f"{group}: {sum(o != 'survived' for _, o in part)}/{len(part)} killed")
    if scored:
        print(f"score: {killed}/{len(scored)} killed ({100 * killed / len(scored):.0f}%)"
              + (f"; not applied: {', '.join(skipped)}" if skipped else ""))
    return rows


if __name__ == "__main__":
    main()
