"""eval.py: the metrics against hand-computed values, the device helpers on a CPU-only machine, and the
command line on a fixture CSV dataset: a train.py checkpoint evaluated (table, JSON, CSV with the right
rows, the same MAE as train.py measured), zero-shot CLIP, --images, --plot, and clear errors for a
missing file or a checkpoint of another model."""
import csv
import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

import clip_loader
import data
import eval as ev
import train

# --------------------------------------------------------------------------- metrics by hand


def test_mae_and_cumulative_score_by_hand():
    pred, true = [10, 20, 33, 41], [12, 20, 30, 45]   # errors 2, 0, 3, 4
    assert ev.mae(pred, true) == pytest.approx(9 / 4)
    cs = ev.cumulative_score(pred, true)
    assert list(cs) == list(range(11))
    # inclusive: an error of exactly theta counts at theta
    assert [cs[t] for t in range(6)] == [0.25, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(cs[t] == 1.0 for t in range(4, 11))


def test_epsilon_error_by_hand():
    # image 1 hits the mean vote exactly (0); image 2 is 2 years off with sigma 2: 1 - exp(-4 / 8)
    value = ev.epsilon_error([20, 30], [20, 28], [5, 2])
    assert value == pytest.approx((0 + 1 - math.exp(-0.5)) / 2)
    assert value == pytest.approx(0.196734670, abs=1e-9)
    assert ev.epsilon_error([50], [10], [1]) == pytest.approx(1.0)   # far off: the worst score
    with pytest.raises(ValueError, match="> 0"):
        ev.epsilon_error([1], [1], [0])


def test_mae_per_decade_by_hand():
    pred, true = [11, 14, 21, 30, 9.5, 52], [9.5, 12, 20, 33, 9, 45]
    table = ev.mae_per_decade(pred, true)
    assert list(table) == ["0-9", "10-19", "20-29", "30-39", "40-49"]
    assert table["0-9"] == {"n": 2, "mae": pytest.approx((1.5 + 0.5) / 2)}
    assert table["10-19"] == {"n": 1, "mae": pytest.approx(2.0)}
    assert table["40-49"] == {"n": 1, "mae": pytest.approx(7.0)}


def test_spearman_by_hand_with_ties():
    # ranks of a with the tie averaged: 1, 2.5, 2.5, 4; of b: 1, 3, 2, 4 -> rho = 4.5 / sqrt(4.5 * 5)
    assert ev.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert ev.spearman([1, 5, 9, 10], [0.1, 0.2, 3, 40]) == pytest.approx(1.0)   # monotone, not linear
    assert ev.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(ev.spearman([1, 1, 1], [1, 2, 3]))
    assert list(ev._average_ranks([3.0, 1.0, 3.0, 3.0, 2.0])) == [4.0, 1.0, 4.0, 4.0, 2.0]


def test_compute_metrics_collects_everything():
    pred, true = np.array([10.0, 20, 33, 41]), np.array([12.0, 20, 30, 45])
    steps = np.stack([pred + 1, pred], axis=1)   # feedback step 0 one year worse for every image
    metrics = ev.compute_metrics(pred, true, steps, uncertainty=[2, 0, 3, 4], age_std=[np.nan, np.nan, 2, 4])
    assert metrics["mae_per_feedback_step"] == pytest.approx([ev.mae(pred + 1, true), 2.25])
    assert metrics["spearman_uncertainty_error"] == pytest.approx(1.0)   # uncertainty = |error| exactly
    expected = np.mean([1 - math.exp(-9 / 8), 1 - math.exp(-16 / 32)])   # only where the std is known
    assert metrics["epsilon_error"] == pytest.approx(expected) and metrics["epsilon_n"] == 2
    json.dumps(metrics)   # JSON-able
    table = ev.format_table(metrics)
    assert "2.250" in table and "epsilon-error" in table and "30-39" in table
    plain = ev.compute_metrics(pred, true, uncertainty=np.zeros(4))
    assert "epsilon_error" not in plain and "spearman_uncertainty_error" not in plain   # no std, no feedback


# --------------------------------------------------------------------------- CUDA paths on a CPU

def test_device_helpers_degrade_cleanly_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert ev.autocast_dtype(cpu) is None   # fp32 on the CPU
    assert isinstance(ev.autocast(cpu, None), nullcontext)
    x = torch.arange(4.0)
    assert torch.equal(ev.move_to(x, cpu), x)   # non_blocking is only asked for on CUDA
    assert ev.select_device("cpu") == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.select_device("auto") == cpu
    with pytest.raises(SystemExit, match="no usable CUDA GPU"):
        ev.select_device("cuda")
    # the dtype choice on GPUs, exercised without one
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert ev.autocast_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert ev.autocast_dtype(torch.device("cuda")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev.select_device("auto") == torch.device("cuda")
    with ev.autocast(cpu, torch.bfloat16):   # the autocast context itself works on the CPU too
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    # train.py and eval.py set the same numerics on a GPU (TF32, cuDNN autotuning), the CPU's are left alone
    precision, benchmark = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    ev.configure_device(cpu)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == (precision, benchmark)
    try:
        ev.configure_device(torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.benchmark = benchmark


# --------------------------------------------------------------------------- the command line

AGES = [3, 9, 15, 22, 28, 35, 41, 47, 55, 62, 70, 78, 84, 90, 30, 60, 20, 50, 75, 5]
SPLITS = ["train"] * 12 + ["val"] * 4 + ["test"] * 4


@pytest.fixture(scope="module")
def fixture_dataset(tmp_path_factory):
    """A CSV dataset of 20 synthetic drawings (train 12 / val 4 / test 4), with apparent-age std."""
    root = tmp_path_factory.mktemp("csvdata")
    (root / "img").mkdir()
    rows = []
    for i, (age, split) in enumerate(zip(AGES, SPLITS)):
        image = data.render_synthetic(age, np.random.default_rng(i), 40)
        Image.fromarray(image).save(root / "img" / f"{i:02d}.png")
        rows.append([f"img/{i:02d}.png", age, 1.0 + i % 3, split])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "age", "age_std", "split"]] + rows)
    return root / "labels.csv"


TINY = ["--depth", "1", "--width", "32", "--heads", "2", "--feedback-hidden", "32", "--batch-size", "4",
        "--clip", "random", "--epochs", "2"]


@pytest.fixture(scope="module")
def trained_run(fixture_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train.main(["--dataset", "csv", "--data-root", str(fixture_dataset), "--out", str(out), *TINY])
    return out, result


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_of_a_train_checkpoint_writes_table_json_csv(trained_run, fixture_dataset, tmp_path, capsys):
    run, train_result = trained_run
    metrics = ev.main(["--ckpt", str(run / "best.pt"), "--out", str(tmp_path)])
    table = capsys.readouterr().out
    # rebuilt from the checkpoint alone, the model predicts what it predicted inside train.py
    assert metrics["mae"] == pytest.approx(train_result["test_mae"], abs=1e-4)
    assert metrics["n"] == 4 and metrics["split"] == "test" and metrics["dataset"] == "csv"
    assert len(metrics["mae_per_feedback_step"]) == 3   # y0 and two corrections (CILFConfig default)
    assert "epsilon_error" in metrics and "spearman_uncertainty_error" in metrics
    assert f"{metrics['mae']:.3f}" in table and "CS(theta)" in table and "epsilon-error" in table
    assert json.loads((tmp_path / "metrics.json").read_text())["mae"] == pytest.approx(metrics["mae"])
    rows = read_csv(tmp_path / "predictions.csv")
    expected = [(f"{i:02d}.png", age) for i, (age, split) in enumerate(zip(AGES, SPLITS)) if split == "test"]
    assert [(r["path"].rsplit("/", 1)[-1], float(r["age"])) for r in rows] == expected
    errors = [abs(float(r["predicted_age"]) - float(r["age"])) for r in rows]
    assert np.mean(errors) == pytest.approx(metrics["mae"], abs=1e-3)
    assert all(float(r["uncertainty"]) >= 0 for r in rows)


def test_eval_uses_the_runs_autocast_unless_told(trained_run, tmp_path, monkeypatch):
    """A run trained with --amp bf16 is evaluated under bf16 autocast (on this CPU too); --amp off overrides
    it; a run with --amp auto gets autocast_dtype's choice (none on the CPU)."""
    run, _ = trained_run
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"]["train"]["amp"] = "bf16"
    torch.save(ckpt, tmp_path / "bf16.pt")
    seen, predict = [], ev.predict
    monkeypatch.setattr(ev, "predict", lambda model, loader, device, amp_dtype=None, zero_shot=False, tta="none": (
        seen.append(amp_dtype), predict(model, loader, device, amp_dtype, zero_shot, tta))[1])
    ev.main(["--ckpt", str(tmp_path / "bf16.pt"), "--out", str(tmp_path / "a")])
    ev.main(["--ckpt", str(tmp_path / "bf16.pt"), "--amp", "off", "--out", str(tmp_path / "b")])
    ev.main(["--ckpt", str(run / "best.pt"), "--out", str(tmp_path / "c")])
    assert seen == [torch.bfloat16, None, None]


def test_eval_other_split_and_dataset_options(trained_run, tmp_path):
    run, _ = trained_run
    metrics = ev.main(["--ckpt", str(run / "best.pt"), "--split", "val", "--out", str(tmp_path)])
    assert metrics["n"] == 2 and metrics["split"] == "val"   # the csv's 4 val images, halved by split_validation
    assert len(read_csv(tmp_path / "predictions.csv")) == 2


def test_images_mode_predicts_without_labels(trained_run, fixture_dataset, tmp_path):
    run, _ = trained_run
    folder = fixture_dataset.parent / "img"
    single = folder / "00.png"
    ev.main(["--ckpt", str(run / "best.pt"), "--images", str(folder), str(single), "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == len(AGES) + 1 and rows[-1]["path"] == str(single)
    assert all(r["face"] == "0" and 0 <= float(r["predicted_age"]) <= 100 for r in rows)
    with pytest.raises(SystemExit, match="does not exist"):
        ev.main(["--ckpt", str(run / "best.pt"), "--images", str(tmp_path / "nope"), "--out", str(tmp_path)])


def test_unreadable_test_images_are_left_out(trained_run, fixture_dataset, tmp_path, capsys):
    run, _ = trained_run
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    rows = [["path", "age", "split"], [str(fixture_dataset.parent / "img" / "16.png"), 75, "test"],
            ["broken.png", 40, "test"], [str(fixture_dataset.parent / "img" / "17.png"), 5, "test"]]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.warns(UserWarning, match="broken.png"):
        metrics = ev.main(["--ckpt", str(run / "best.pt"), "--dataset", "csv", "--data-root",
                           str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out")])
    assert metrics["n"] == 2 and "1 unreadable image(s) left out" in capsys.readouterr().err
    written = read_csv(tmp_path / "out" / "predictions.csv")
    assert [(r["path"].rsplit("/", 1)[-1], float(r["age"])) for r in written] == [("16.png", 75), ("17.png", 5)]


def test_zero_shot_with_a_clip_file(fixture_dataset, tmp_path):
    torch.manual_seed(0)
    clip_file = tmp_path / "tiny_clip.pt"
    torch.save(clip_loader.CLIP(**train.DEMO_CLIP).state_dict(), clip_file)
    metrics = ev.main(["--zero-shot", "--clip", str(clip_file), "--dataset", "csv", "--data-root",
                       str(fixture_dataset), "--out", str(tmp_path / "zs")])
    assert metrics["mode"] == "zero-shot" and metrics["n"] == 4
    assert len(metrics["mae_per_feedback_step"]) == 1   # no feedback in raw CLIP
    assert len(read_csv(tmp_path / "zs" / "predictions.csv")) == 4


def test_plot_or_a_clear_hint(trained_run, tmp_path, capsys):
    run, _ = trained_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match=r"pip install matplotlib"):
            ev.main(["--ckpt", str(run / "best.pt"), "--out", str(tmp_path), "--plot"])
        assert not (tmp_path / "metrics.json").exists()   # told before any work is done
    else:
        ev.main(["--ckpt", str(run / "best.pt"), "--out", str(tmp_path), "--plot"])
        assert (tmp_path / "cs_curve.png").stat().st_size > 0 and (tmp_path / "scatter.png").stat().st_size > 0


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found: .*missing.pt"):
        ev.main(["--ckpt", str(tmp_path / "missing.pt")])
    clip_sd = tmp_path / "plain_clip.pt"
    torch.save(clip_loader.CLIP(**train.DEMO_CLIP).state_dict(), clip_sd)
    with pytest.raises(SystemExit, match="plain_clip.pt: not a CILF-CIAE checkpoint.*--zero-shot"):
        ev.main(["--ckpt", str(clip_sd)])
    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "config": {"model": {}, "train": {}}}, other)
    with pytest.raises(SystemExit, match="other.pt: its model has no 'clip.' weights"):
        ev.main(["--ckpt", str(other)])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="garbage.pt: cannot be read"):
        ev.main(["--ckpt", str(garbage)])


def test_checkpoint_with_mismatched_weights(trained_run, tmp_path):
    run, _ = trained_run
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"]["model"]["width"] = 48   # the saved config no longer describes the weights
    bad = tmp_path / "mismatch.pt"
    torch.save(ckpt, bad)
    with pytest.raises(SystemExit, match="mismatch.pt: config.model: its sizes make fusion.in_proj.weight of shape"):
        ev.main(["--ckpt", str(bad)])


# --------------------------------------------------------------------------- --summarize

def write_metrics(folder, dataset, split, n, mae, cs5, **more):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"n": n, "mae": mae, "cs": {str(t): cs5 if t == 5 else 0.0
                                                     for t in range(11)}, "dataset": dataset, "split": split, **more}))


def test_summarize_three_splits_and_a_leave_one_subject_out_protocol_by_hand(tmp_path, capsys):
    runs = tmp_path / "runs"
    for i, (n, mae, cs5) in enumerate([(10, 2.0, 0.5), (20, 3.0, 0.6), (70, 4.0, 0.9)]):
        write_metrics(runs / f"morph_split{i}" / "eval_test", "morph2", "test", n, mae, cs5)
    write_metrics(runs / "morph_split0" / "eval_val", "morph2", "val", 8, 1.5, 0.75)
    write_metrics(runs / "morph_split0" / "eval_test_flip", "morph2", "test", 10, 1.0, 1.0, tta="flip")
    for person, (n, mae) in enumerate([(2, 1.0), (3, 4.0), (5, 2.0), (10, 3.0)]):
        write_metrics(runs / f"fgnet_lopo{person}" / "eval_test", "fgnet", "test", n, mae, 0.5)
    # a run folder (its eval_* folders), evaluation folders as a shell glob gives them, one given twice
    summary = ev.main(["--summarize", str(runs / "morph_split0"), *map(str, sorted(runs.glob("morph_split*/eval_test"))),
                       *map(str, sorted(runs.glob("fgnet_lopo*")))])
    groups = {g["test_set"]: g for g in summary}
    assert list(groups) == ["morph2 test", "morph2 test tta flip", "morph2 val", "fgnet test"]
    morph = groups["morph2 test"]
    assert morph["evaluations"] == 3 and morph["images"] == 100
    assert morph["mae_mean"] == pytest.approx(3.0) and morph["mae_std"] == pytest.approx(1.0)   # sqrt((1 + 0 + 1) / 2)
    assert morph["cs5_mean"] == pytest.approx(2 / 3)
    assert morph["cs5_std"] == pytest.approx(math.sqrt(((0.5 - 2 / 3) ** 2 + (0.6 - 2 / 3) ** 2 + (0.9 - 2 / 3) ** 2) / 2))
    assert morph["mae_over_images"] == pytest.approx((20 + 60 + 280) / 100)    # sum of |errors| / images
    assert morph["cs5_over_images"] == pytest.approx((5 + 12 + 63) / 100)
    assert groups["morph2 val"]["evaluations"] == 1 and groups["morph2 val"]["mae_std"] is None
    fgnet = groups["fgnet test"]   # leave one subject out: the image-weighted MAE is the protocol's figure
    assert fgnet["mae_over_images"] == pytest.approx((2 + 12 + 10 + 30) / 20) and fgnet["mae_mean"] == pytest.approx(2.5)
    table = capsys.readouterr().out
    assert "3.00 ± 1.00" in table and "66.67 ± 20.82" in table and "3.60" in table and "2.70" in table
    written = json.loads((runs / "summary.json").read_text())   # the folder holding every PATH
    assert written["test_sets"] == json.loads(json.dumps(summary))


def test_summarize_bad_input_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "eval_test").mkdir(parents=True)
    write_metrics(tmp_path / "no_count", "morph2", "test", 0, 2.0, 0.5)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    for path, message in ((tmp_path / "missing", "missing does not exist"),
                          (tmp_path / "empty", "empty holds no metrics.json and no eval_\\* folder"),
                          (tmp_path / "run", "eval_test holds no metrics.json"),
                          (tmp_path / "no_count", "no_count/metrics.json: not an evaluation's metrics.json .* n \\(an "
                                                  "image count\\)"),
                          (tmp_path / "broken", "broken/metrics.json: not readable as JSON")):
        with pytest.raises(SystemExit, match=f"^--summarize: .*{message}") as error:
            ev.main(["--summarize", str(path)])
        assert "\n" not in str(error.value)


def test_summarize_reads_what_eval_writes_and_tta_is_recorded(trained_run, tmp_path):
    run, _ = trained_run
    plain = ev.main(["--ckpt", str(run / "best.pt"), "--out", str(tmp_path / "eval_test")])
    flip = ev.main(["--ckpt", str(run / "best.pt"), "--tta", "flip", "--out", str(tmp_path / "eval_test_flip")])
    assert plain["tta"] == "none" and flip["tta"] == "flip" and flip["mae"] != plain["mae"]
    summary = ev.main(["--summarize", str(tmp_path), "--out", str(tmp_path / "summary")])
    assert [(g["test_set"], g["mae_mean"], g["images"]) for g in summary] == [
        ("csv test", plain["mae"], 4), ("csv test tta flip", flip["mae"], 4)]
    assert (tmp_path / "summary" / "summary.json").is_file()


def test_argument_errors():
    with pytest.raises(SystemExit):
        ev.parse_args([])   # neither --ckpt nor --zero-shot nor --summarize
    with pytest.raises(SystemExit):
        ev.parse_args(["--zero-shot"])   # --zero-shot without --clip
