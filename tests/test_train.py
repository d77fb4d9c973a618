"""train.py: the schedule, seeds and checkpoint helpers; the demo in a shortened form learns; a run killed
with SIGKILL and resumed ends with bit-identical weights (several processes: tests/test_distributed.py); gradient
accumulation matches a full batch; --grad-checkpoint trains the same weights; one training loader serves
the run with the same workers; a non-finite loss stops the run with its message and the last good
checkpoint intact; a rerun with other options into the same folder is refused."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train

ROOT = Path(__file__).resolve().parents[1]
# A tiny but complete model: every module on (fusion with the linear mixer, contrastive, feedback).
# The demo CLIP's architecture with random weights (--clip random): the pretrained one takes minutes to build.
TINY = ["--synthetic-n", "96", "32", "32", "--depth", "1", "--width", "32", "--heads", "2",
        "--feedback-hidden", "32", "--batch-size", "16", "--clip", "random"]


def run_script(args, env=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def comparable(state):
    """The weights whose gradient is not zero by construction. The key bias of softmax attention has a true
    gradient of 0 (softmax ignores a constant added to every logit of a query), so AdamW turns its rounding
    noise, which depends on how a batch is split, into steps of size lr: left out of the comparison."""
    out = {}
    for k, v in state.items():
        if k.endswith("attn.in_proj_bias"):   # [q; k; v] biases
            w = v.shape[0] // 3
            v = torch.cat([v[:w], v[2 * w:]])
        out[k] = v
    return out


def log_lines(out, kind):
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["type"] == kind]


def stop_in_epoch_2(monkeypatch, argv):
    """train.main(argv) stopped at the start of its second epoch, as a kill would: last.pt holds epoch 1."""
    real_epoch, calls = train.train_epoch, []

    def epoch_or_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train, "train_epoch", epoch_or_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(train, "train_epoch", real_epoch)


# --------------------------------------------------------------------------- helpers

def test_lr_factor_warmup_then_cosine():
    f = lambda step: train.lr_factor(step, total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])   # linear warm-up
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)   # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert train.lr_factor(0, 10, 0) == pytest.approx(1.0)   # no warm-up


def test_mix_seed_is_deterministic_and_spreads():
    assert train.mix_seed(0, 1, 2) == train.mix_seed(0, 1, 2)
    seeds = {train.mix_seed(s, e, r) for s in range(3) for e in range(20) for r in range(4)}
    assert len(seeds) == 240 and all(0 <= s < 2 ** 63 for s in seeds)


def test_what_the_parser_produces_passes_the_check_of_saved_options():
    """Each value a run saves (resolved, through JSON as config.json holds it) is one train.py's parser could
    produce: flags, lists of nargs values, choices, defaults resolved later; so no honest run is refused."""
    for argv in ([], ["--clip", "random", "--synthetic-n", "5", "6", "7", "--compile", "--max-age", "110.5"],
                 ["--dataset", "facebase", "--database", "a.json", "--data-root", "/d", "--protocol", "x"]):
        saved = json.loads(json.dumps(vars(train.parse_args(argv))))
        train.check_saved_options(saved, "last.pt")
        train.check_saved_options(vars(train.parse_args(argv)), "last.pt")


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    train.save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def torn_save(obj, f):   # a write that dies half way, as a kill or a full disk would
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        train.save_checkpoint(path, {"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"epoch": 1}   # the old checkpoint is intact
    train.save_checkpoint(path, {"epoch": 3})
    assert torch.load(path, weights_only=True) == {"epoch": 3}


def test_default_workers_share_the_usable_cores_among_the_training_processes(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, processes, expected in [(16, None, 8), (6, None, 6), (1, None, 1), (16, "4", 4), (3, "4", 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        if processes:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
        assert train.default_workers() == expected, (cores, processes)
        assert train.parse_args([]).workers == expected and train.parse_args(["--workers", "0"]).workers == 0


def test_one_training_loader_keeps_its_workers_and_each_epochs_order():
    """The run's loader serves every epoch with the same worker processes, in the order a new DataLoader
    per epoch seeded with mix_seed(seed, epoch) drew (how train.py built it before: every seed keeps its
    batches)."""
    args = train.parse_args(["--synthetic-n", "24", "8", "8", "--batch-size", "8", "--workers", "1", "--seed", "3"])
    labelled = [(torch.zeros(1), float(i)) for i in range(24)]
    loader = train.build_train_loader(labelled, args, 1, torch.device("cpu"))
    workers = []
    for epoch in range(3):
        train.data.set_epoch(loader, epoch)
        order = [int(a) for _, ages in loader for a in ages]
        workers.append([w.pid for w in loader._iterator._workers])
        fresh = torch.utils.data.DataLoader(labelled, batch_size=8, shuffle=True, drop_last=True,
                                            generator=torch.Generator().manual_seed(train.mix_seed(3, epoch)))
        assert order == [int(a) for _, ages in fresh for a in ages], epoch
    assert workers[0] == workers[1] == workers[2] and len(workers[0]) == 1


def test_defaults_depend_on_the_mode():
    demo = train.parse_args([])
    assert demo.dataset == "synthetic" and demo.clip == str(train.DEMO_CLIP_FILE)
    assert demo.clip_lr == train.DEMO_CLIP_LR
    assert demo.out == os.path.abspath("runs/demo") and demo.width == train.DEMO_MODEL["width"]
    random_clip = train.parse_args(["--clip", "random"])
    assert random_clip.clip == "random" and random_clip.clip_lr == random_clip.lr
    real = train.parse_args(["--dataset", "utkface", "--data-root", "x", "--clip", "ViT-B-16.pt"])
    assert real.data_root == os.path.abspath("x") and real.clip == os.path.abspath("ViT-B-16.pt")
    assert real.clip_lr < real.lr and real.out == os.path.abspath("runs/utkface") and real.width == train.CILFConfig().width
    # the drawings train on the evaluation transform, real photos with the authors' augmentation
    assert (demo.augment, real.augment, train.parse_args(["--augment", "on"]).augment) == ("off", "on", "on")
    assert train.build_config(demo).freeze_text_tower and train.build_config(real).freeze_text_tower
    assert not train.build_config(random_clip).freeze_text_tower
    pretrain = train.parse_args(["--objective", "clip"])
    assert pretrain.out == str(train.DEMO_CLIP_FILE.parent)
    assert (pretrain.epochs, pretrain.batch_size, pretrain.lr) == tuple(
        train.PRETRAIN[k] for k in ("epochs", "batch_size", "lr"))
    config = train.build_config(train.parse_args(["--mixer", "fourier", "--contrastive-weight", "0",
                                                  "--feedback-steps", "0", "--image-tower", "freeze"]))
    assert (config.mixer, config.contrastive_weight, config.feedback_steps) == ("fourier", 0.0, 0)
    # y0 keeps its own L1 in every mode, unless set
    assert (config.l1_weight, demo.l1_weight, train.build_config(demo).l1_weight) == (1.0, 1.0, 1.0)
    assert train.parse_args(["--l1-weight", "0.5"]).l1_weight == 0.5
    assert config.freeze_image_tower and config.freeze_text_tower


# --------------------------------------------------------------------------- training runs

def test_short_demo_learns(tmp_path, capsys):
    result = train.main(["--out", str(tmp_path), "--clip", "random", "--synthetic-n", "256", "64", "64", "--epochs", "3",
                         "--batch-size", "32"])
    printed = capsys.readouterr().out
    steps = log_lines(tmp_path, "step")
    assert len(steps) == 3 * (256 // 32)
    first, last = np.mean([s["loss"] for s in steps[:4]]), np.mean([s["loss"] for s in steps[-4:]])
    assert last < 0.9 * first, (first, last)
    assert {"distribution", "l1", "contrastive", "feedback", "uncertainty"} <= set(steps[0])   # y0 keeps its L1
    epochs = log_lines(tmp_path, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all(math.isfinite(e["val_mae"]) for e in epochs)
    assert result["test_mae"] > 0 and result["baseline_mae"] > 0
    assert f"test MAE {result['test_mae']:.3f}" in printed and f"{result['baseline_mae']:.3f}" in printed
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["mixer"] == "linear" and config["train"]["epochs"] == 3
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["best_val_mae"] == min(e["val_mae"] for e in epochs)
    assert set(best) >= {"model", "optimizer", "scheduler", "step", "epoch", "config", "history"}
    assert "rng" not in best   # every epoch reseeds every generator: no RNG state to restore


def test_ce_baseline_trains_on_the_demo_and_eval_rebuilds_it(tmp_path):
    """--method ce-baseline: the first step's loss is the cross-entropy of a uniform distribution over the
    101 classes, log 101 (the head starts at zero), whatever the batch; the loss falls; eval.py rebuilds
    the baseline from best.pt alone and predicts what train.py tested."""
    import eval as ev
    from model import LinearAgeBaseline
    result = train.main(["--method", "ce-baseline", "--out", str(tmp_path), "--clip", "random", "--synthetic-n",
                         "128", "32", "32", "--epochs", "3", "--batch-size", "32"])
    steps = log_lines(tmp_path, "step")
    assert steps[0]["loss"] == pytest.approx(math.log(101), rel=1e-6) and set(steps[0]) >= {"cross_entropy"}
    assert np.mean([s["loss"] for s in steps[-4:]]) < 0.97 * math.log(101)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["method"] == "ce-baseline" and "mixer" not in config["model"]
    model, calibration = ev.load_model(tmp_path / "best.pt")
    assert isinstance(model, LinearAgeBaseline) and calibration["n"] == 16   # the 32 val images, halved
    metrics = ev.main(["--ckpt", str(tmp_path / "best.pt"), "--out", str(tmp_path / "eval")])
    assert metrics["mae"] == pytest.approx(result["test_mae"], abs=1e-4) and "prompt_age_order" not in metrics
    with pytest.raises(SystemExit):   # its text tower is never read: training it is refused
        train.parse_args(["--method", "ce-baseline", "--text-tower", "train"])


def test_anchored_run_with_random_text_is_rebuilt_by_eval_and_its_sizes_checked(tmp_path):
    """--feedback-design anchored --text-embeddings random: eval.py rebuilds the model from best.pt alone (the
    frozen tower and the random vectors are in it) and predicts what train.py tested; a config whose
    feedback query would be another width is refused by name before anything is built."""
    import eval as ev
    result = train.main([*TINY, "--epochs", "1", "--out", str(tmp_path), "--feedback-design", "anchored",
                         "--text-embeddings", "random", "--text-tower", "freeze"])
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    state = ckpt["model"]
    assert not torch.equal(state["anchor.conv1.weight"], state["clip.visual.conv1.weight"])   # only one trained
    model, _ = ev.load_model(tmp_path / "best.pt")
    assert torch.equal(model.text_embeddings(), state["random_text"]) and not model.anchor.training
    metrics = ev.main(["--ckpt", str(tmp_path / "best.pt"), "--out", str(tmp_path / "eval")])
    assert metrics["mae"] == pytest.approx(result["test_mae"], abs=1e-4)
    for field, value in (("feedback_text", False), ("feedback_design", "reread")):
        changed = {**ckpt, "config": {**ckpt["config"], "model": {**ckpt["config"]["model"], field: value}}}
        assert ev.checkpoint_problem(changed)[1].startswith("its sizes make feedback.query.0.weight")
    with pytest.raises(SystemExit):   # a random T never reads the text tower: training it is refused
        train.parse_args(["--text-embeddings", "random", "--text-tower", "train"])


def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    args = [sys.executable, "train.py", *TINY, "--epochs", "3"]
    straight = tmp_path / "straight"
    done = run_script(args + ["--out", str(straight)])
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill it in the middle of its second epoch (6 steps an epoch): once step 8 is in the log
    deadline, log = time.time() + 200, killed / "log.jsonl"
    while proc.poll() is None and time.time() < deadline and not (
            log.exists() and '"step": 8,' in log.read_text()):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 3, "the kill should land before the run finished"
    resumed = run_script([sys.executable, "train.py", *TINY, "--epochs", "3", "--out", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed after epoch {state['epoch']}" in resumed.stdout

    a, b = weights(straight / "last.pt"), weights(killed / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.cat([v.flatten() for v in weights(straight / "best.pt").values()]),
                       torch.cat([v.flatten() for v in weights(killed / "best.pt").values()]))
    # the log holds each step once, with the same losses
    strip = lambda lines: [{k: v for k, v in l.items() if k not in ("seconds", "train_images_per_s")} for l in lines]
    assert strip(log_lines(straight, "step")) == strip(log_lines(killed, "step"))
    assert strip(log_lines(straight, "epoch")) == strip(log_lines(killed, "epoch"))
    # a finished run rerun into its folder only reports its result again
    again = run_script([sys.executable, "train.py", *TINY, "--epochs", "3", "--out", str(killed)])
    assert again.returncode == 0 and "resumed after epoch 3" in again.stdout and "test MAE" in again.stdout


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    common = [*TINY, "--epochs", "1", "--contrastive-weight", "0", "--feedback-noise", "0"]  # per-batch draws
    train.main([*common, "--out", str(tmp_path / "full")])
    train.main([*common, "--accum-steps", "2", "--out", str(tmp_path / "accum")])
    a, b = comparable(weights(tmp_path / "full" / "last.pt")), comparable(weights(tmp_path / "accum" / "last.pt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_grad_checkpoint_trains_the_same_weights(tmp_path, monkeypatch):
    import clip_loader
    calls, checkpoint = [], clip_loader.checkpoint
    monkeypatch.setattr(clip_loader, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    common = [*TINY, "--epochs", "1", "--synthetic-n", "32", "16", "16"]
    train.main([*common, "--out", str(tmp_path / "plain")])
    assert not calls
    train.main([*common, "--grad-checkpoint", "--out", str(tmp_path / "checkpointed")])
    assert calls   # the blocks went through torch.utils.checkpoint
    a, b = weights(tmp_path / "plain" / "last.pt"), weights(tmp_path / "checkpointed" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, nan_images_at_step):
    steps_per_epoch = 96 // 16
    with nan_images_at_step(steps_per_epoch + 2), pytest.raises(SystemExit) as stop:
        train.main([*TINY, "--epochs", "3", "--out", str(tmp_path)])
    message = str(stop.value)
    assert f"non-finite loss at step {steps_per_epoch + 2} (epoch 2" in message
    assert "distribution=nan" in message and "after epoch 1" in message
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values()
                                      if v.is_floating_point())
    assert log_lines(tmp_path, "step")[-1]["step"] == steps_per_epoch + 1   # nothing logged past the failure


def test_rerun_with_other_options_is_refused(tmp_path):
    train.main([*TINY, "--epochs", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--mixer: 'linear' in the run, 'fourier' now"):
        train.main([*TINY, "--epochs", "1", "--out", str(tmp_path), "--mixer", "fourier"])
    with pytest.raises(SystemExit, match="no checkpoint to continue from"):
        train.main([*TINY, "--out", str(tmp_path / "empty"), "--resume"])


def test_the_other_run_s_values_are_shortened_in_the_refusal(tmp_path):
    """A saved option may hold megabytes (a data root of 10 MB passes as text) and a field of an earlier
    version an integer Python will not print: each value is shown by its first 60 characters at most."""
    saved = {"train": {"data_root": "x" * 10 ** 7, "seed": 0, "legacy": [10 ** 5000]}}
    with pytest.raises(SystemExit) as stop:
        train.check_same_run(saved, {"train": {"data_root": "/data", "seed": 0}}, tmp_path)
    message = str(stop.value)
    assert f"--data-root: {repr('x' * 10 ** 7)[:60]}... in the run, '/data' now" in message
    assert "--legacy: a list too long to print in the run, None now" in message
    assert "--seed" not in message and len(message) < 400


# --------------------------------------------------------------------------- findings of the independent review

def test_fp16_path_scales_the_loss_and_resumes_exactly(tmp_path, monkeypatch):
    """--amp fp16 (the path of GPUs without bf16, run here on the CPU, which torch supports): a GradScaler
    scales the loss, skips the steps whose fp16 gradients overflow and lowers its scale; its state is in
    the checkpoint, so a run stopped after epoch 1 and resumed ends with the same weights and scale."""
    common = [*TINY, "--epochs", "2", "--amp", "fp16", "--device", "cpu"]
    train.main([*common, "--out", str(tmp_path / "straight")])
    scales = [s["grad_scale"] for s in log_lines(tmp_path / "straight", "step")]
    assert len(scales) == 12 and scales[0] < 65536.0 and min(scales) < scales[5]   # it acted in both epochs
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert straight["scaler"]["scale"] == scales[-1]

    stop_in_epoch_2(monkeypatch, [*common, "--out", str(tmp_path / "stopped")])
    train.main([*common, "--out", str(tmp_path / "stopped")])
    resumed = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert resumed["scaler"] == straight["scaler"]
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert [s["grad_scale"] for s in log_lines(tmp_path / "stopped", "step")] == scales


def test_other_precisions_have_no_scaler_state(tmp_path):
    train.main([*TINY, "--epochs", "1", "--amp", "bf16", "--out", str(tmp_path)])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["scaler"] == {} and "grad_scale" not in log_lines(tmp_path, "step")[0]


def test_age_classes_max_by_hand():
    assert train.age_classes_max([3, 40.5, 80], min_age=0) == 100       # at least 100
    assert train.age_classes_max([3, 116], min_age=0) == 116
    assert train.age_classes_max([2, 100.2], min_age=0) == 101           # rounded up
    assert train.age_classes_max([16, 116], min_age=0.5) == 116.5        # onto the grid 0.5 + k


def test_age_classes_cover_the_training_split_up_to_116(tmp_path):
    """UTKFace goes to 116: the classes must reach the oldest training age, saved in config and checkpoint."""
    from PIL import Image
    import data
    ages, splits = [2, 30, 61, 88, 104, 116, 45, 70, 20, 50], ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    rows = ["path,age,split"]
    for i, (age, split) in enumerate(zip(ages, splits)):
        Image.fromarray(data.render_synthetic(age, np.random.default_rng(i), 32)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{age},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    common = ["--dataset", "csv", "--data-root", str(tmp_path / "labels.csv"), "--depth", "1", "--width", "32",
              "--heads", "2", "--feedback-hidden", "32", "--batch-size", "3", "--epochs", "1", "--clip", "random"]
    train.main([*common, "--out", str(tmp_path / "run")])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["max_age"] == 116 and config["train"]["max_age"] == 116
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["model"]["ages"][-1].item() == 116 and ckpt["config"]["model"]["max_age"] == 116
    with pytest.raises(SystemExit, match="below the oldest training age, 116"):
        train.main([*common, "--max-age", "100", "--out", str(tmp_path / "run100")])


def test_label_sigma_age_std_gives_each_training_image_its_own_std(tmp_path, monkeypatch, capsys):
    """--label-sigma age-std on a CSV with an age_std column: in 2 steps every training image's target
    distribution has its own row's std (at least 1 year; --sigma-y for a row without one), the std
    travelling with its image through the loader; the run config records the choice; eval.py rebuilds the
    model. Left to the default, the same CSV (2 rows without a std) trains with the fixed sigma."""
    from PIL import Image
    import data
    import eval as ev
    import model
    ages, stds = [3, 15, 28, 41, 55, 70, 84, 90, 20, 50, 35, 65], ["0.5", "3", "7", "", "2.5", "", "4", "9"]
    rows = ["path,age,age_std,split"]
    for i, age in enumerate(ages):
        Image.fromarray(data.render_synthetic(age, np.random.default_rng(i), 32)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{age},{stds[i] if i < 8 else ''},{'train' if i < 8 else 'val' if i < 10 else 'test'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    seen, gaussian = [], model.gaussian_label_distribution
    monkeypatch.setattr(model, "gaussian_label_distribution", lambda target, classes, sigma: (
        seen.append((target.tolist(), sigma)), gaussian(target, classes, sigma))[1])
    common = ["--dataset", "csv", "--data-root", str(tmp_path / "labels.csv"), "--depth", "1", "--width", "32",
              "--heads", "2", "--feedback-hidden", "32", "--batch-size", "4", "--epochs", "1", "--clip", "random"]
    train.main([*common, "--label-sigma", "age-std", "--out", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert "2 of 8 training images have no age_std; their label distribution keeps --sigma-y 2" in printed
    by_hand = {3: 1.0, 15: 3.0, 28: 7.0, 41: 2.0, 55: 2.5, 70: 2.0, 84: 4.0, 90: 9.0}   # floor 1, sigma_y 2
    assert len(seen) == 2 and all(torch.is_tensor(sigma) and sigma.shape == (4,) for _, sigma in seen)
    assert sorted((y, s) for target, sigma in seen for y, s in zip(target, sigma.tolist())) == sorted(by_hand.items())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["label_sigma"] == config["train"]["label_sigma"] == "age-std"
    ev.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "eval")])
    seen.clear()
    train.main([*common, "--out", str(tmp_path / "default")])
    assert json.loads((tmp_path / "default" / "config.json").read_text())["model"]["label_sigma"] == "fixed"
    assert [sigma for _, sigma in seen] == [2.0, 2.0]


def test_label_sigma_age_std_is_refused_without_stds_and_for_the_ce_baseline(tmp_path):
    with pytest.raises(SystemExit, match=r"^--label-sigma age-std: no training image of --dataset synthetic has an "
                                         r"apparent-age std \(.*\); use --label-sigma fixed$"):
        train.main([*TINY, "--label-sigma", "age-std", "--epochs", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):   # a usage error (argparse): plain cross-entropy targets have no sigma
        train.parse_args(["--method", "ce-baseline", "--label-sigma", "age-std"])


def test_clip_bn_option_and_syncbatchnorm_under_ddp():
    import clip_loader
    from model import CILFCIAE
    assert train.build_config(train.parse_args([])).clip_bn == "frozen"
    args = train.parse_args(["--clip-bn", "train"])
    assert train.build_config(args).clip_bn == "train"
    torch.manual_seed(0)
    clip = clip_loader.CLIP(32, 64, (1, 1, 1, 1), 8, None, 16, 49408, 32, 2, 1)   # a tiny ResNet CLIP
    model = CILFCIAE(clip, train.build_config(args))
    keys = list(model.state_dict())
    assert train.sync_batchnorm(model, args, torch.device("cpu"), world=1) is model   # one process: nothing
    with pytest.raises(SystemExit, match="SyncBatchNorm has no CPU kernel"):
        train.sync_batchnorm(model, args, torch.device("cpu"), world=2)
    synced = train.sync_batchnorm(model, args, torch.device("cuda"), world=2)   # converted, not run, here
    kinds = {type(m) for m in synced.clip.visual.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    assert list(synced.state_dict()) == keys
    frozen = train.parse_args([])
    assert train.sync_batchnorm(model, frozen, torch.device("cuda"), world=2) is model


def test_gpu_check_runs_the_fp16_path():
    """bench/gpu_check.sh cannot run without a GPU; its train.py commands parse, and one takes the fp16 path."""
    import shlex
    script = (ROOT / "bench" / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = [shlex.split(line.split("|")[0].split(" 2>")[0].replace('"$out', '"/tmp/x'))
                for line in script.splitlines() if " train.py " in line and not line.lstrip().startswith("#")]
    parsed = [train.parse_args(c[c.index("train.py") + 1:]) for c in commands]
    assert len(parsed) >= 3 and all(a.device == "cuda" for a in parsed)
    assert any(a.amp == "fp16" for a in parsed) and any(a.amp == "auto" for a in parsed)


def test_gpu_check_is_valid_bash_and_its_python_commands_parse():
    """bench/gpu_check.sh: bash accepts it, and each python/torchrun command's arguments pass its script's
    argparse (the README commands' runner, which stops at the parse)."""
    import shlex
    from test_readme import RUNNER, script_and_args
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
    script = (ROOT / "bench" / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = []
    for line in script.splitlines():
        if line.lstrip().startswith("#") or not re.search(r"\b(python|torchrun) ", line):
            continue
        words = shlex.split(line.split("|")[0].replace('"$out', '"/tmp/x'))
        for start in [i for i, w in enumerate(words) if w in ("python", "torchrun")][:1]:
            if words[start + 1:start + 2] not in (["-m"], ["-c"]):
                commands.append(script_and_args(words[start:]))
    assert {c[0] for c in commands} == {"train.py", "bench/train.py", "bench/memory.py", "bench/data.py"}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(commands), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["ok"] * len(commands)
