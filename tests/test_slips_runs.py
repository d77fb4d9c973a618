"""Slips in train.py and eval.py that no test saw (found by a mutation review): each test here
fails when the rule is written wrong and passes on the correct code (bench/mutations.py applies each slip
and runs these tests). They test what a user relies on, through the command-line entry points where they
can, so that they hold whatever function the rule ends up living in:

1. best.pt is the epoch of lowest *validation* MAE (measured again by eval.py on the validation split),
   and a resumed run does not replace it with a worse epoch;
2. the learning rate AdamW uses at every step is the group's base rate times the schedule (observed at
   AdamW.step, not in the log);
3. eval.py refuses new photos of a training subject, evaluates a checkpoint with its CLIP's own
   normalisation (command line and predict API), and floors a negative uncertainty in the interval;
8. accumulating 2 micro-batches of 4 gives the gradients of one batch of 8 (compared as .grad, before the
   optimizer step, where AdamW's scale invariance cannot hide a factor).
"""
import argparse
import copy
import json
import math

import numpy as np
import pytest
import torch

import clip_loader
import data
import eval as ev
import train
from model import CILFCIAE, CILFConfig

# 96 / 32 / 32 drawings, batches of 16: 6 steps an epoch; the demo CLIP's architecture with random weights
TINY = ["--synthetic-n", "96", "32", "32", "--depth", "1", "--width", "32", "--heads", "2",
        "--feedback-hidden", "32", "--batch-size", "16", "--clip", "random"]
EPOCHS, STEPS_PER_EPOCH, LR, CLIP_LR = 3, 6, 1e-3, 3e-4


def log_lines(out, kind):
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["type"] == kind]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-epoch run, with the learning rates of every group seen by AdamW at each step."""
    out = tmp_path_factory.mktemp("slips_run") / "run"
    applied, real_step = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        applied.append(sorted(group["lr"] for group in self.param_groups))
        return real_step(self, *args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step)
        result = train.main([*TINY, "--epochs", str(EPOCHS), "--lr", str(LR), "--clip-lr", str(CLIP_LR),
                             "--out", str(out)])
    return out, result, applied


def validation_mae(ckpt, out_dir):
    """eval.py's MAE of a checkpoint on the run's validation split: an independent measurement."""
    return ev.main(["--ckpt", str(ckpt), "--split", "val", "--out", str(out_dir)])["mae"]


# --------------------------------------------------------------------------- 1 the checkpoint is chosen on validation

def test_best_pt_holds_the_epoch_of_lowest_validation_mae(run, tmp_path):
    out, result, _ = run
    epochs = log_lines(out, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    # the val_mae the loop logs (and selects on) is the validation split's, as eval.py measures it
    assert validation_mae(out / "last.pt", tmp_path / "last") == pytest.approx(epochs[-1]["val_mae"], rel=1e-5)
    best_epoch = min(epochs, key=lambda e: e["val_mae"])
    assert validation_mae(out / "best.pt", tmp_path / "best") == pytest.approx(best_epoch["val_mae"], rel=1e-5)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == result["best_epoch"] == best_epoch["epoch"]
    assert best["best_val_mae"] == pytest.approx(best_epoch["val_mae"])


def write_csv_dataset(root, val_age=None):
    """labels.csv (path, age, split) of 48 / 16 / 16 drawings; val_age: relabel every validation image."""
    from PIL import Image
    root.mkdir(exist_ok=True)
    rows, rng = ["path,age,split"], np.random.default_rng(0)
    for i, split in enumerate(["train"] * 48 + ["val"] * 16 + ["test"] * 16):
        age = int(rng.integers(10, 70))
        if not (root / f"{i}.png").exists():
            Image.fromarray(data.render_synthetic(age, np.random.default_rng(i), 37)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{val_age if split == 'val' and val_age is not None else age},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_resumed_run_keeps_the_best_pt_of_the_epoch_before_the_stop(tmp_path, nan_images_at_step):
    """Stopped in epoch 3 (a non-finite loss), resumed: epoch 3 is worse on validation than the best epoch
    before the stop (the validation labels were changed, and the change allowed), so it must not replace
    best.pt: the resumed run remembers the best validation MAE."""
    labels = write_csv_dataset(tmp_path / "data")
    common = ["--dataset", "csv", "--data-root", str(labels), "--depth", "1", "--width", "32", "--heads", "2",
              "--feedback-hidden", "32", "--batch-size", "16", "--clip", "random", "--epochs", "3",
              "--out", str(tmp_path / "run")]
    with nan_images_at_step(6), pytest.raises(SystemExit, match="non-finite loss at step 6"):
        train.main(common)   # 3 steps an epoch: the first step of epoch 3
    before = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert before["epoch"] in (1, 2)
    write_csv_dataset(tmp_path / "data", val_age=95)
    result = train.main([*common, "--allow-data-change"])
    epochs = log_lines(tmp_path / "run", "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[2]["val_mae"] > before["best_val_mae"] + 10   # the resumed epoch is clearly worse
    after = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert after["epoch"] == before["epoch"] == result["best_epoch"]
    assert after["best_val_mae"] == before["best_val_mae"] == epochs[2]["best_val_mae"]
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])


# --------------------------------------------------------------------------- 2 the rate the loop applies

def test_each_step_applies_the_base_rate_times_the_schedule(run):
    """Warm-up over the first epoch, then cosine to 1% of the peak (train.py's defaults), each group from
    its own base rate (--lr for the new modules, --clip-lr for CLIP): never the previous rate times a
    factor (a compounding decay)."""
    _, _, applied = run
    total, warmup, floor = EPOCHS * STEPS_PER_EPOCH, STEPS_PER_EPOCH, 0.01

    def factor(step):   # by hand, not train.lr_factor
        if step < warmup:
            return (step + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    assert len(applied) == total
    for step, rates in enumerate(applied):
        expected = sorted([CLIP_LR * factor(step)] * 2 + [LR * factor(step)] * 2)   # with and without decay
        assert rates == pytest.approx(expected, rel=1e-9), step


# --------------------------------------------------------------------------- 3 eval.py

def write_subject_csv(root, rows):
    from PIL import Image
    root.mkdir(exist_ok=True)
    lines = ["path,age,subject,split"]
    for i, (name, subject, split) in enumerate(rows):
        Image.fromarray(data.render_synthetic(30, np.random.default_rng(i), 32)).save(root / name)
        lines.append(f"{name},30,{subject},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_eval_refuses_new_photos_of_a_training_subject(tmp_path):
    """The run trained on ann's photos (its data_index says so); a test split holding other photos of ann,
    under other names, is refused: an identity seen in training is no test of the model."""
    ckpt = {"config": {"train": {"dataset": "csv", "fold": 0, "seed": 0, "dataset_options": {}},
                       "data": {"root": str(tmp_path / "old")}},
            "data_index": [["ann_1.png", 1234, 30.0, None, "ann", "train"],
                           ["bob_1.png", 1234, 30.0, None, "bob", "val"]]}
    labels = write_subject_csv(tmp_path / "new", [("ann_7.png", "ann", "test"), ("cat_1.png", "cat", "train"),
                                                  ("dan_1.png", "dan", "val")])
    test = data.build_dataset("csv", str(labels), split="test", seed=0)
    with pytest.raises(SystemExit, match="training subjects"):
        ev.check_no_training_overlap(ckpt, "csv", "test", test, 0, 0, {})
    val = data.build_dataset("csv", str(labels), split="val", seed=0)   # dan: never trained on
    ev.check_no_training_overlap(ckpt, "csv", "val", val, 0, 0, {})


MEAN, STD = (0.2, 0.6, 0.4), (0.15, 0.4, 0.3)   # a CLIP whose preprocessing is not OpenAI's


def renormalised(x):
    """Images made with OpenAI's mean and std (data.eval_transform's defaults), normalised with MEAN, STD."""
    view = lambda v: torch.tensor(v).view(3, 1, 1)
    raw = x * view(clip_loader.CLIP_STD) + view(clip_loader.CLIP_MEAN)
    return (raw - view(MEAN)) / view(STD)


@pytest.fixture
def odd_normalisation_checkpoint(run, tmp_path):
    """The run's best.pt, its CLIP record saying the CLIP was trained with MEAN, STD (as a Hugging Face or
    open_clip CLIP may be): evaluating it with OpenAI's normalisation gives other ages."""
    out, _, _ = run
    ckpt = torch.load(out / "best.pt", weights_only=True)
    ckpt["config"]["clip"].update(image_mean=list(MEAN), image_std=list(STD))
    train.save_checkpoint(tmp_path / "odd.pt", ckpt)
    return tmp_path / "odd.pt", ckpt


def test_eval_uses_the_loaded_models_own_normalisation(odd_normalisation_checkpoint, tmp_path):
    path, ckpt = odd_normalisation_checkpoint
    model, _ = ev.load_model(path)
    test = data.build_dataset("synthetic", None, split="test", seed=0, transform=data.eval_transform(32),
                              **ckpt["config"]["train"]["dataset_options"])
    images = torch.stack([test[i][0] for i in range(len(test))])
    target = np.array([s.age for s in test.samples])
    with torch.no_grad():
        right = np.abs(model(renormalised(images)).age.numpy() - target).mean()
        wrong = np.abs(model(images).age.numpy() - target).mean()
    assert abs(right - wrong) > 1e-3   # the normalisation matters to this model
    metrics = ev.main(["--ckpt", str(path), "--out", str(tmp_path / "eval")])
    assert metrics["mae"] == pytest.approx(right, rel=1e-5)


def test_predict_api_uses_the_loaded_models_own_normalisation(odd_normalisation_checkpoint):
    path, ckpt = odd_normalisation_checkpoint
    model, calibration = ev.load_model(path)
    test = data.build_dataset("synthetic", None, split="test", seed=0, **ckpt["config"]["train"]["dataset_options"])
    pictures = [test.image(i) for i in range(8)]
    images = torch.stack([data.eval_transform(32)(p) for p in pictures])
    with torch.no_grad():
        right, wrong = model(renormalised(images)).age.numpy(), model(images).age.numpy()
    assert np.abs(right - wrong).max() > 1e-3
    got = ev.predict_images(model, pictures, calibration)
    np.testing.assert_allclose(got.age, right, rtol=1e-5, atol=1e-4)


def test_negative_uncertainty_counts_as_zero_in_the_interval():
    """u below 0 (a model or file that allows it) gives the interval of u = 0, never an inverted one."""
    calibration = ev.calibrate([0.0] * 4, [1.0, 2.0, 3.0, 4.0], [0.0] * 4, "toy val", levels=(0.6,))
    lower, upper = ev.conformal_interval([50.0, 50.0, 50.0], [-3.0, -0.5, 0.0], calibration, 0.6)
    assert lower.tolist() == [47.0] * 3 and upper.tolist() == [53.0] * 3   # q = 3: 50 -+ 3 * (0 + 1)
    metrics = ev.interval_metrics([50.0], [52.0], [-3.0], calibration, 0.6)
    assert metrics["coverage"] == 1.0 and metrics["mean_width"] == 6.0


# --------------------------------------------------------------------------- 8 accumulation, compared as .grad

class GradientRecorder(torch.optim.SGD):
    """An optimizer that records the gradients it is asked to step with, and does not step."""

    def __init__(self, params):
        super().__init__([{"params": params, "base_lr": 0.0}], lr=0.0)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for p in self.param_groups[0]["params"]])


def accumulated_gradients(model, batches, accum_steps):
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = GradientRecorder(params)
    args = argparse.Namespace(accum_steps=accum_steps, grad_clip=0.0, epochs=1)
    state = {"step": 0, "epoch": 0, "rank": 0}
    train.train_epoch(model, model, batches, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                      lambda step: 1.0, state, args, torch.device("cpu"), None, 1, lambda record: None)
    assert state["step"] == len(optimizer.grads)
    return optimizer.grads


def test_two_micro_batches_of_4_give_the_gradients_of_one_batch_of_8():
    """With clipping off, the contrastive loss off (it compares the images of a batch with each other) and
    no perturbation of the feedback's hypotheses (drawn per batch), the gradient an optimizer step sees is
    that of the whole batch: every loss part is a mean over its images, so each of k micro-batches counts
    1/k. A last group shorter than the others (here 1 micro-batch of 4) counts as a batch of 4."""
    torch.manual_seed(0)
    clip = clip_loader.CLIP(**train.DEMO_CLIP)
    config = CILFConfig(depth=1, width=32, heads=2, feedback_hidden=32, contrastive_weight=0.0, feedback_noise=0.0)
    model = CILFCIAE(clip, config)
    with torch.no_grad():   # a trained-looking model: the fusion's and the feedback's last layers not zero
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("clip."):
                p.add_(0.02 * torch.randn_like(p))
    images, ages = torch.randn(12, 3, 32, 32), torch.tensor([5.0, 12, 20, 27, 33, 40, 48, 55, 61, 70, 77, 90])
    micro = [(images[i:i + 4], ages[i:i + 4]) for i in (0, 4, 8)]
    full = accumulated_gradients(model, [(images[:8], ages[:8]), (images[8:], ages[8:])], accum_steps=1)
    accumulated = accumulated_gradients(model, micro, accum_steps=2)
    assert len(full) == len(accumulated) == 2
    for step in range(2):
        for a, b in zip(accumulated[step], full[step]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max().item() for g in full[0]) > 1e-3   # gradients that can show a factor
