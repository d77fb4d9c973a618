"""Runs that cannot silently go wrong, one section per finding of the fault review, all from
fixtures written here (tiny PNG drawings, CSVs, FG-NET names):
 1 paths stored absolute            2 dataset fingerprint           3 split integrity
 4 eval refuses overlapping splits  5 results never lost            6 non-finite-loss advice that works
 7 eval --images survives bad files 8 image-size guard               9 one unreadable-image policy
10 log.jsonl never NUL-padded      11 option validation             12 hangs and unclear messages"""
import csv
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth", "1", "--width", "32", "--heads", "2", "--feedback-hidden", "32", "--batch-size", "4",
        "--workers", "0", "--clip", "random"]
N_IMAGES = 24   # 12 subjects of 2 images each


def _png(path, age, seed, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.render_synthetic(age, np.random.default_rng(seed), size)).save(path)
    return path


def _write_csv(path, rows, header=("path", "age", "subject")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([list(header)] + rows)
    return path


def _subject_dataset(root):
    """labels.csv (path, age, subject) of N_IMAGES drawings of 12 people, split by the seeded subject rule."""
    rows = []
    for i in range(N_IMAGES):
        _png(root / "img" / f"{i:02d}.png", 5 + 3 * i, i)
        rows.append([f"img/{i:02d}.png", 5 + 3 * i, f"person{i // 2}"])
    return _write_csv(root / "labels.csv", rows)


def _messages(call, capsys):
    """The SystemExit message of call(), or argparse's error line (it prints, then exits with 2)."""
    with pytest.raises(SystemExit) as stop:
        call()
    return str(stop.value) if stop.value.code not in (0, 2) else capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run on the subject CSV, started with a RELATIVE --data-root from its parent."""
    base = tmp_path_factory.mktemp("integrity")
    labels = _subject_dataset(base / "data")
    out = base / "run"
    cwd = os.getcwd()
    os.chdir(base)
    try:
        result = train.main(["--dataset", "csv", "--data-root", "data/labels.csv", "--out", "run", *TINY,
                             "--epochs", "2"])
    finally:
        os.chdir(cwd)
    return out, labels, result


# --------------------------------------------------------------------------- 1 absolute paths

def test_paths_are_stored_absolute_and_eval_reads_them_from_anywhere(run, tmp_path, monkeypatch):
    out, labels, result = run
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["data_root"] == str(labels) and config["train"]["out"] == str(out)
    # another folder with the same relative name holds other images: eval must not read them
    _png(tmp_path / "data" / "img" / "00.png", 90, 99)
    _write_csv(tmp_path / "data" / "labels.csv", [["img/00.png", 90, "someone"]] * 1)
    monkeypatch.chdir(tmp_path)
    metrics = ev.main(["--ckpt", str(out / "best.pt"), "--out", str(tmp_path / "e")])
    assert metrics["mae"] == pytest.approx(result["test_mae"], abs=1e-6)
    # a checkpoint written before paths were absolute: refused, not read relative to here
    old = torch.load(out / "best.pt", weights_only=True)
    old["config"]["train"]["data_root"] = "data/labels.csv"
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="relative --data-root 'data/labels.csv'.*give --data-root"):
        ev.main(["--ckpt", str(tmp_path / "old.pt")])


# --------------------------------------------------------------------------- 2 fingerprint

def test_fingerprint_is_stored_and_a_changed_dataset_is_refused(tmp_path, capsys, monkeypatch, nan_images_at_step):
    labels = _subject_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--dataset", "csv", "--data-root", str(labels), "--out", str(out), *TINY, "--epochs", "2"]
    with nan_images_at_step(5), pytest.raises(SystemExit, match="non-finite"):   # stopped after epoch 1
        train.main(args)                                                          # (5 steps an epoch)
    config = json.loads((out / "config.json").read_text())
    last = torch.load(out / "last.pt", weights_only=True)
    entries = [e for e in last["data_index"]]
    assert config["data"]["fingerprint"] == last["config"]["data"]["fingerprint"] == data.fingerprint(entries)
    assert len(entries) == N_IMAGES and {e[5] for e in entries} == {"train", "val", "test"}
    # the fingerprint follows names, sizes and labels, by hand: one label changed gives another hash
    relabelled = [list(e) for e in entries]
    relabelled[0][2] += 1
    assert data.fingerprint(relabelled) != data.fingerprint(entries)
    assert data.fingerprint(entries[::-1]) == data.fingerprint(entries)   # order does not matter

    # one image added: the seeded split would change; resume and eval refuse, saying what changed
    _png(tmp_path / "data" / "img" / "new.png", 50, 123)
    with open(labels, "a", newline="") as f:
        csv.writer(f).writerow(["img/new.png", 50, "newcomer"])
    with pytest.raises(SystemExit, match=r"dataset changed.*1 file\(s\) added \(e\.g\. img/new\.png\)"):
        train.main(args)
    with pytest.raises(SystemExit, match=r"changed since this run was trained: 1 file\(s\) added"):
        ev.main(["--ckpt", str(out / "last.pt"), "--out", str(tmp_path / "e")])
    # a relabelled image is named as such
    text = labels.read_text().replace("img/03.png,14,", "img/03.png,15,")
    labels.write_text(text)
    with pytest.raises(SystemExit, match=r"1 file\(s\) relabelled \(e\.g\. img/03\.png\)"):
        train.main(args)
    # --allow-data-change continues and records the change, in config.json and the checkpoint
    train.main(args + ["--allow-data-change"])
    changes = json.loads((out / "config.json").read_text())["data"]["changes"]
    assert len(changes) == 1 and changes[0]["after_epoch"] == 1 and "added" in changes[0]["what"]
    assert torch.load(out / "last.pt", weights_only=True)["config"]["data"]["changes"] == changes
    assert json.loads((out / "config.json").read_text())["train"]["allow_data_change"] is True
    metrics = ev.main(["--ckpt", str(out / "last.pt"), "--out", str(tmp_path / "e")])
    assert "data_change_allowed" not in metrics   # epoch 2 was trained on the new data: its fingerprint


# --------------------------------------------------------------------------- 3 split integrity

def test_csv_split_column_contradicting_subjects_names_the_rows(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", 20 + i, i)
    rows = [["img/0.png", 20, "ann", "train"], ["img/1.png", 21, "bob", "train"],
            ["img/2.png", 22, "ann", "test"], ["img/3.png", 23, "cy", "val"]]
    labels = _write_csv(tmp_path / "labels.csv", rows, ("path", "age", "subject", "split"))
    with pytest.raises(data.DatasetError, match=r"subject 'ann' is in 2 splits \(train: .*labels\.csv:2; "
                                                r"test: .*labels\.csv:4\)"):
        data.build_dataset("csv", labels, split="test")


def test_csv_one_image_listed_twice_is_an_error(tmp_path):
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", 20 + i, i)
    # the same image with two subjects, and the same file spelled through '..'
    for rows in ([["img/0.png", 20, "ann"], ["img/1.png", 21, "bob"], ["img/0.png", 20, "cy"]],
                 [["img/0.png", 20, "ann"], ["img/1.png", 21, "bob"], ["img/../img/0.png", 20, "dan"],
                  ["img/2.png", 22, "eve"]]):
        labels = _write_csv(tmp_path / "labels.csv", rows)
        with pytest.raises(data.DatasetError, match=r"labels\.csv:[24], .*labels\.csv:[24] are the same image"):
            data.build_dataset("csv", labels, split="all")
    # a symlink to an image already listed is the same image too
    os.symlink(tmp_path / "img" / "1.png", tmp_path / "img" / "link.png")
    labels = _write_csv(tmp_path / "labels.csv", [["img/1.png", 21, "bob"], ["img/link.png", 21, "ann"]])
    with pytest.raises(data.DatasetError, match="are the same image"):
        data.build_dataset("csv", labels)


def test_split_integrity_check_directly():
    s = lambda path, subject: data.Sample(path, 30.0, subject)
    good = {"train": [s("/a", "x"), s("/b", "y")], "val": [s("/c", "z")], "test": [s("/d", "w")]}
    data.check_split_integrity("t", good)
    shared = {"train": [s("/a", "x")], "val": [], "test": [s("/d", "x")]}
    with pytest.raises(data.DatasetError, match="subject 'x' is in 2 splits"):
        data.check_split_integrity("t", shared)
    data.check_split_integrity("t", shared, subject_exclusive=False)   # morph2 --protocol random, declared
    with pytest.raises(data.DatasetError, match="same image"):
        data.check_split_integrity("t", {"train": [s("/a", "x")], "val": [], "test": [s("/a/../a", "y")]},
                                   subject_exclusive=False)


# --------------------------------------------------------------------------- 4 eval refuses overlaps

FGNET_NAMES = ["001A02.png", "001A10.png", "002A05.png", "002A18.png", "003A30.png", "004A30.png",
               "004A61.png", "005A07.png", "006A40.png", "007A50.png"]


def test_eval_refuses_a_fold_or_seed_whose_test_split_holds_training_images(tmp_path, capsys):
    for i, name in enumerate(FGNET_NAMES):
        _png(tmp_path / "fgnet" / name, int(name[4:6]), i)
    out = tmp_path / "run"
    train.main(["--dataset", "fgnet", "--data-root", str(tmp_path / "fgnet"), "--fold", "0", "--out", str(out),
                *TINY, "--epochs", "1"])
    capsys.readouterr()
    ckpt = str(out / "best.pt")
    metrics = ev.main(["--ckpt", ckpt, "--out", str(tmp_path / "e0")])
    assert "evaluating fgnet test split: protocol leave-one-person-out, fold 0, seed 0" in capsys.readouterr().out
    assert (metrics["protocol"], metrics["fold"], metrics["seed"], metrics["n"]) == ("leave-one-person-out", 0, 0, 2)
    # fold 1 tests subject 002, a training subject of the fold-0 run
    message = _messages(lambda: ev.main(["--ckpt", ckpt, "--fold", "1", "--out", str(tmp_path / "e1")]), capsys)
    assert "refusing to evaluate: 2 of the 2 test images are training images" in message
    assert "leave-one-person-out, fold 0, seed 0" in message and "fold 1, seed 0" in message
    assert not (tmp_path / "e1" / "metrics.json").exists()
    # the same files under another name (a CSV) overlap too
    rows = [[f"fgnet/{n}", int(n[4:6]), "x", "test"] for n in FGNET_NAMES[2:4]]
    labels = _write_csv(tmp_path / "other.csv", rows, ("path", "age", "subject", "split"))
    with pytest.raises(SystemExit, match="2 of the 2 test images are training images"):
        ev.main(["--ckpt", ckpt, "--dataset", "csv", "--data-root", str(labels), "--out", str(tmp_path / "e2")])
    # --split train is looking at training images on purpose: allowed
    assert ev.main(["--ckpt", ckpt, "--split", "train", "--out", str(tmp_path / "e3")])["n"] > 0


def test_eval_refuses_another_split_seed(run, tmp_path):
    out, labels, _ = run
    subjects = lambda split, seed: {s.subject for s in data.build_dataset("csv", labels, split=split, seed=seed).samples}
    trained = subjects("train", 0)
    overlapping = next(seed for seed in range(1, 50) if subjects("test", seed) & trained)
    disjoint = next(seed for seed in range(1, 50) if not subjects("test", seed) & trained)
    with pytest.raises(SystemExit, match=rf"training images \(or training subjects\).*seed 0.*seed {overlapping}"):
        ev.main(["--ckpt", str(out / "best.pt"), "--seed", str(overlapping), "--out", str(tmp_path)])
    metrics = ev.main(["--ckpt", str(out / "best.pt"), "--seed", str(disjoint), "--out", str(tmp_path)])
    assert metrics["seed"] == disjoint
    # another CSV, elsewhere, listing two of the run's training images by absolute path as its test split
    train_paths = [s.path for s in data.build_dataset("csv", labels, split="train").samples][:2]
    other = _write_csv(tmp_path / "other.csv", [[p, 30, "test"] for p in train_paths], ("path", "age", "split"))
    with pytest.raises(SystemExit, match="2 of the 2 test images are training images"):
        ev.main(["--ckpt", str(out / "best.pt"), "--data-root", str(other), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        ev.parse_args(["--ckpt", "x.pt", "--seed", "-1"])


# --------------------------------------------------------------------------- 5 never lose a result

def test_best_pt_is_not_replaced_by_a_run_with_other_options(tmp_path):
    labels = _subject_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--dataset", "csv", "--data-root", str(labels), "--out", str(out), *TINY, "--epochs", "1"]
    train.main(args)
    best = (out / "best.pt").read_bytes()
    (out / "last.pt").unlink()
    with pytest.raises(SystemExit, match=r"--sigma-y: 2\.0 in the run, 5\.0 now"):
        train.main(args + ["--sigma-y", "5"])
    assert (out / "best.pt").read_bytes() == best
    train.main(args)   # the same run started again may rewrite it


def test_an_out_folder_with_foreign_files_is_refused(tmp_path):
    for name, content in (("notes.txt", "my notes"), ("config.json", '{"lr": 3}')):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text(content)
        with pytest.raises(SystemExit, match=f"holds files train.py did not write \\({name}\\)"):
            train.main([*TINY, "--synthetic-n", "8", "4", "4", "--epochs", "1", "--out", str(folder)])
        assert (folder / name).read_text() == content and not (folder / "log.jsonl").exists()


def test_a_running_train_py_holds_its_folder(tmp_path):
    (tmp_path / train.LOCK_FILE).write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); f.write('pid 4242'); "
         "f.flush(); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(tmp_path / train.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=r"in use by another train.py \(pid 4242"):
            train.main([*TINY, "--synthetic-n", "8", "4", "4", "--epochs", "1", "--out", str(tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "config.json").exists()


def test_outputs_with_non_utf8_file_names_and_atomic_writes(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")   # Latin-1 bytes in a file name: a surrogate escape in Python
    result = {"target": np.array([30.0]), "age": np.array([31.5]), "uncertainty": np.array([0.5])}
    ev.write_predictions(tmp_path / "predictions.csv", [name], result)
    raw = (tmp_path / "predictions.csv").read_bytes()
    assert b"caf\xe9.png,30,31.5000,0.5000" in raw   # the name's own bytes
    ev.write_json(tmp_path / "m.json", {"path": name})
    assert json.loads((tmp_path / "m.json").read_text())["path"] == name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "predictions.csv"]   # no temporary files


# --------------------------------------------------------------------------- 6 non-finite-loss advice

def test_non_finite_loss_advice_is_a_command_that_runs(tmp_path, monkeypatch, nan_images_at_step):
    out = tmp_path / "run"
    args = [*TINY, "--synthetic-n", "16", "4", "4", "--epochs", "2", "--lr", "0.002", "--out", str(out)]
    with nan_images_at_step(5), pytest.raises(SystemExit) as stop:
        train.main(args)
    command = str(stop.value).splitlines()[-1].strip()
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"]
    assert words[words.index("--lr") + 1] == "0.0002" and words[words.index("--out") + 1] == f"{out}_lr0.0002"
    result = train.main(words[2:])   # the advice works as given
    assert result["test_mae"] > 0


# --------------------------------------------------------------------------- 7 eval --images

def test_images_mode_survives_bad_files_in_workers(run, tmp_path, capsys):
    out, labels, _ = run
    folder = tmp_path / "photos"
    for i in range(3):
        _png(folder / f"ok{i}.png", 30, i)
    (folder / "._ok0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")   # macOS metadata beside ok0.png
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    (folder / "sub").mkdir()
    (folder / "sub" / "very_broken.jpg").write_bytes(b"")
    os.mkfifo(folder / "pipe.png")
    ev.main(["--ckpt", str(out / "best.pt"), "--images", str(folder), "--workers", "2", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert "._ok0.png (a macOS metadata file)" in err and "pipe.png (not a regular file)" in err
    assert f"2 unreadable image(s) left out: {folder / 'broken.png'}, {folder / 'sub' / 'very_broken.jpg'}" in err
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["ok0.png", "ok1.png", "ok2.png"]


# --------------------------------------------------------------------------- 8 image-size guard

def test_image_guard_bounds_aspect_and_decoded_bytes(tmp_path, monkeypatch):
    strip = tmp_path / "strip.png"
    Image.new("L", (1, 20000)).save(strip)   # ~100 bytes on disk; 224 x 4.5 M pixels after a CLIP resize
    with pytest.raises(ValueError, match=r"1x20000 pixels: aspect ratio beyond 16:1"):
        data.load_image(strip)
    Image.new("RGBA", (300, 300)).save(tmp_path / "rgba.png")
    Image.new("L", (300, 300)).save(tmp_path / "grey.png")
    monkeypatch.setattr(data, "MAX_DECODED_BYTES", 300 * 300 * 2)   # stand-in for 512 MiB
    with pytest.raises(ValueError, match=r"300x300 RGBA pixels would decode to 0 MiB, above"):
        data.load_image(tmp_path / "rgba.png")   # 4 bytes a pixel
    assert data.load_image(tmp_path / "grey.png").size == (300, 300)   # 1 byte a pixel passes
    # a JPEG that JPEG draft decodes at reduced size is judged after the draft: it passes
    Image.new("RGB", (800, 800), (200, 10, 10)).save(tmp_path / "big.jpg")
    monkeypatch.setattr(data, "LARGE_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(data, "LARGE_IMAGE_SIDE", 100)
    assert min(data.load_image(tmp_path / "big.jpg").size) >= 100
    with pytest.raises(ValueError, match="RGB pixels would decode"):
        data.load_image(_png(tmp_path / "big.png", 30, 0, size=800))   # PNG has no draft: refused


# --------------------------------------------------------------------------- 9 one unreadable-image policy

def test_train_and_eval_agree_on_a_split_with_an_unreadable_image(tmp_path, capsys):
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    rows = [[f"img/{i:02d}.png", 10 + 5 * i, split] for i, split in enumerate(splits)]
    for i in range(12):
        _png(tmp_path / "img" / f"{i:02d}.png", 10 + 5 * i, i)
    (tmp_path / "img" / "08.png").write_bytes(b"not a png")   # a test image that does not decode
    labels = _write_csv(tmp_path / "labels.csv", rows, ("path", "age", "split"))
    out = tmp_path / "run"
    with pytest.warns(data.ImageSkipWarning, match="08.png"):
        result = train.main(["--dataset", "csv", "--data-root", str(labels), "--out", str(out), *TINY,
                             "--epochs", "1"])
    assert "1 of 4 image(s) unreadable, left out of this MAE" in capsys.readouterr().err
    with pytest.warns(data.ImageSkipWarning, match="08.png"):
        metrics = ev.main(["--ckpt", str(out / "best.pt"), "--out", str(tmp_path / "e")])
    assert metrics["n"] == 3 and metrics["unreadable"] == 1
    assert abs(metrics["mae"] - result["test_mae"]) < 1e-6


# --------------------------------------------------------------------------- 10 log.jsonl

def test_short_or_missing_log_is_continued_without_nul_bytes(tmp_path):
    (tmp_path / "log.jsonl").write_bytes(b'{"type": "step"}\n')
    log = train.open_log(tmp_path, offset=5000, rank=0)   # the checkpoint expects 5000 bytes
    log({"type": "epoch", "epoch": 1})
    raw = (tmp_path / "log.jsonl").read_bytes()
    assert b"\x00" not in raw and log.offset() == len(raw)
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert [line["type"] for line in lines] == ["step", "note", "epoch"]
    (tmp_path / "log.jsonl").unlink()
    train.open_log(tmp_path, offset=5000, rank=0)({"type": "test"})
    assert [json.loads(line)["type"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == ["note", "test"]


def test_finished_run_rerun_with_its_log_deleted(run, capsys):
    out, _, result = run
    (out / "log.jsonl").unlink()
    again = train.main(["--dataset", "csv", "--data-root", str(out.parent / "data" / "labels.csv"), "--out",
                        str(out), *TINY, "--epochs", "2"])
    assert again["test_mae"] == pytest.approx(result["test_mae"], abs=1e-6)
    raw = (out / "log.jsonl").read_bytes()
    assert b"\x00" not in raw and [json.loads(l)["type"] for l in raw.decode().splitlines()] == ["note", "test"]


# --------------------------------------------------------------------------- 11 option validation

@pytest.mark.parametrize("option, message", [
    (["--clip-lr", "-1"], "--clip-lr: must be a finite number >= 0, not -1"),
    (["--grad-clip", "nan"], "--grad-clip: 'nan' is not a finite number"),
    (["--l1-weight", "-0.5"], "--l1-weight: must be a finite number >= 0"),
    (["--contrastive-weight", "inf"], "--contrastive-weight: 'inf' is not a finite number"),
    (["--prompt-template", "a photo of a person."], "--prompt-template: 'a photo of a person.' must hold exactly one"),
    (["--prompt-template", "{} and {}"], "exactly one '{}'"),
    (["--accum-steps", "0"], "--accum-steps: must be a positive integer, not 0"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--width", "0"], "--width: must be a positive integer"),
    (["--synthetic-n", "0", "0", "0"], "--synthetic-n: must be a positive integer"),
    (["--device", "tpu"], "--device: 'tpu' is not one of auto, cpu, cuda"),
    (["--min-age", "50", "--max-age", "20"], "--max-age: need 0 <= min_age < max_age <= 120, not min_age 50 and "
                                             "max_age 20"),
    (["--max-age", "150"], "--max-age: need 0 <= min_age < max_age <= 120, not min_age 0 and max_age 150"),
    (["--min-age", "120"], "--max-age: need 0 <= min_age < max_age <= 120, not min_age 120 and max_age 120"),
    (["--seed", "-1"], "--seed: must be an integer >= 0, not -1"),
    (["--epochs", "2.5"], "--epochs: '2.5' is not an integer"),
    (["--dropout", "1"], "--dropout: must lie in [0, 1)"),
    (["--width", "30", "--heads", "4"], "--heads: must divide the fusion width 30, not 4"),
    (["--feedback-steps", "65"], "--feedback-steps: must be an integer from 0 to 64, not 65"),
    (["--dataset", "utkface"], "--dataset utkface needs --data-root"),
])
def test_nonsense_options_are_one_line_usage_errors(option, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(option)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_options_are_validated(capsys):
    for option in (["--batch-size", "0"], ["--workers", "-1"], ["--device", "gpu"], ["--fold", "-2"]):
        with pytest.raises(SystemExit) as stop:
            ev.parse_args(["--ckpt", "x.pt", *option])
        assert stop.value.code == 2 and option[0] in capsys.readouterr().err


def test_labels_outside_the_age_classes_are_refused(tmp_path):
    labels = _subject_dataset(tmp_path / "data")   # ages 5..74
    with pytest.raises(SystemExit, match=r"training label\(s\) lie outside the age classes 20\.\.\.100 "
                                         r"\(e\.g\. .*labels\.csv:\d+: age \d+\)"):
        train.main(["--dataset", "csv", "--data-root", str(labels), "--out", str(tmp_path / "run"), *TINY,
                    "--epochs", "1", "--min-age", "20"])


# --------------------------------------------------------------------------- 12 hangs and messages

def _returns_within(seconds, call):
    """call()'s outcome (value or exception), or a failure if it blocks (a FIFO would block forever)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:   # noqa: B902 - handed to the test
            outcome["error"] = error
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for {seconds} s"
    return outcome


def test_fifos_are_skipped_with_a_reason_not_opened(tmp_path):
    os.mkfifo(tmp_path / "labels.csv")
    outcome = _returns_within(20, lambda: data.build_dataset("csv", tmp_path / "labels.csv"))
    assert isinstance(outcome["error"], data.DatasetError) and "not a regular file" in str(outcome["error"])
    _png(tmp_path / "img" / "a.png", 30, 0)
    os.mkfifo(tmp_path / "img" / "b.png")
    samples = [data.Sample(str(tmp_path / "img" / n), 30.0) for n in ("a.png", "b.png")]
    outcome = _returns_within(20, lambda: data.check_images(data.AgeDataset(samples)))   # --check-images
    assert [(Path(p).name, "not a regular file" in reason) for p, reason in outcome["value"]] == [("b.png", True)]
    labels = _write_csv(tmp_path / "real.csv", [["img/a.png", 30, "x"], ["img/b.png", 40, "y"]])
    outcome = _returns_within(20, lambda: data.build_dataset("csv", labels))
    assert "real.csv:3: image" in str(outcome["error"]) and "not a regular file" in str(outcome["error"])


def test_clear_messages_for_bad_label_files(tmp_path):
    _png(tmp_path / "img" / "a.png", 30, 0)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(("path,age,subject\n" + "img/a.png,30,Ann\n" * 3000 + "img/a.png,30,Jos\xe9\n").encode("latin-1"))
    with pytest.raises(data.DatasetError, match=r"latin\.csv: not UTF-8 text \(byte 0xe9 on line 3002\)"):
        data.build_dataset("csv", latin)
    std = _write_csv(tmp_path / "std.csv", [["img/a.png", 30, "-2"]], ("path", "age", "age_std"))
    with pytest.raises(data.DatasetError, match=r"std\.csv:2: age_std -2 lies outside"):
        data.build_dataset("csv", std)
    underscore = _write_csv(tmp_path / "u.csv", [["img/a.png", "2_5"]], ("path", "age"))
    with pytest.raises(data.DatasetError, match=r"u\.csv:2: age '2_5' is not a number"):
        data.build_dataset("csv", underscore)


def test_disk_full_is_named_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(obj, f):   # what torch.save raises when the disk fills mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*last\.pt \(\[enforce fail.*MiB free on its file system"):
        train.save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert list(tmp_path.iterdir()) == []


def test_last_pt_that_is_a_folder_is_reported_as_such(tmp_path):
    (tmp_path / "last.pt").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"train": {}, "model": {}}))
    with pytest.raises(SystemExit, match=r"last\.pt is a folder or special file, not a checkpoint"):
        train.main([*TINY, "--synthetic-n", "8", "4", "4", "--epochs", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"checkpoint is a folder, not a checkpoint file: .*last\.pt"):
        ev.main(["--ckpt", str(tmp_path / "last.pt")])


def test_a_last_pt_with_run_state_train_py_did_not_write_is_refused_by_name(tmp_path):
    """A last.pt that torch reads but whose run state was edited or written by another program: one line
    naming the file and the fields, before any training, and the file left as it was. Its saved options are
    held to train.py's own parser (type, number of values, choices, None only where that is the default):
    a value the parser could not have produced is named, not reported as a run with other options."""
    out = tmp_path / "run"
    args = [*TINY, "--synthetic-n", "8", "4", "4", "--epochs", "1", "--out", str(out)]
    train.main(args)
    good = torch.load(out / "last.pt", weights_only=True)
    resume = r"cannot continue from it: .*"
    cases = [({"epoch": "1", "step": -2}, resume + r"not as train.py writes it: step \(negative: -2\), epoch \(a str\)"),
             ({"history": None, "best_val_mae": True}, resume + r"best_val_mae \(a bool\), history \(missing\)"),
             ({"config": {**good["config"], "train": []}}, r"config\.train: must be a dict, not a list"),
             ({"optimizer": {"state": {}, "param_groups": []}}, resume + r"its optimizer cannot be restored \(ValueError"),
             ({"config": {**good["config"], "train": {**good["config"]["train"], "epochs": "1"}}},
              r"config\.train\.epochs: must be an integer, not '1' \(not as train\.py writes it\)"),
             ({"config": {**good["config"], "train": {**good["config"]["train"], "synthetic_n": [8, 4]}}},
              r"config\.train\.synthetic_n: must be a list of 3 values, not 2"),
             ({"config": {**good["config"], "train": {**good["config"]["train"], "compile": 0}}},
              r"config\.train\.compile: must be True or False, not 0"),
             ({"config": {**good["config"], "train": {**good["config"]["train"], "accum_steps": None}}},
              r"config\.train\.accum_steps: must be a value, not None"),
             ({"config": {**good["config"], "train": {**good["config"]["train"], "augment": "sometimes"}}},
              r"config\.train\.augment: must be one of on, off, not 'sometimes'"),
             ({"model": {k: v[:1] if v.ndim else v for k, v in good["model"].items()}},   # refused before building
              r"config\.clip: this is a CLIP with a vocabulary of 1 tokens")]
    for change, message in cases:
        train.save_checkpoint(out / "last.pt", {**good, **change})
        written = (out / "last.pt").read_bytes()
        with pytest.raises(SystemExit, match=r"last\.pt: " + message):
            train.main(args)
        assert (out / "last.pt").read_bytes() == written
    train.save_checkpoint(out / "last.pt", good)   # the file train.py wrote is taken up again
    assert train.main(args)["test_mae"] > 0
