"""Predicting for people (eval.py): split conformal intervals against a hand computation (finite-sample
correction, ties) and their coverage on synthetic exchangeable data within binomial tolerance; train.py's
calibration stored in best.pt and used by eval.py; the predict API against the command line; face crops
with the margin computed by hand; --images with --detect-faces (one row per face, face -1 without one, a
counted skip for a corrupt file) and the one-line error without the [faces] extra."""
import argparse
import csv
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip_loader
import data
import eval as ev
import train

# --------------------------------------------------------------------------- conformal by hand


def test_conformal_quantile_by_hand_with_ties_and_the_finite_sample_correction():
    scores = [3.0, 1.0, 2.0, 2.0, 5.0]   # sorted 1, 2, 2, 3, 5; n = 5
    assert ev.conformal_quantile(scores, 0.5) == 2.0   # ceil(6 * 0.5) = 3rd smallest: the tied 2
    assert ev.conformal_quantile(scores, 0.3) == 2.0   # ceil(1.8) = 2nd: the other tied 2
    assert ev.conformal_quantile(scores, 0.6) == 3.0   # ceil(3.6) = 4th, not the plain 60% quantile (2)
    assert ev.conformal_quantile(scores, 0.8) == 5.0   # ceil(4.8) = 5th
    assert ev.conformal_quantile(scores, 0.9) == math.inf   # ceil(5.4) = 6 > n: too few for 90%
    # (n + 1) level is a whole number that floating point misses: 10 * 0.7 = 7.000000000000001
    assert ev.conformal_quantile(range(1, 10), 0.7) == 7.0
    assert ev.conformal_quantile(range(1, 20), 0.95) == 19.0   # ceil(20 * 0.95) = 19: n = 19 is enough


def test_calibrate_and_interval_by_hand():
    pred, target, unc = [10.0, 20.0, 30.0, 40.0], [12.0, 14.0, 30.5, 40.0], [1.0, 2.0, -0.5, 5.5]
    # u's scale: mean |err| / mean max(u, 0) = (2 + 6 + 0.5 + 0) / (1 + 2 + 0 + 5.5) = 1, so the normalised
    # scores |y - y_hat| / (max(u, 0) + 1) are 2/2, 6/3, 0.5/1, 0/6.5 -> sorted 0, 0.5, 1, 2
    cal = ev.calibrate(pred, target, unc, "toy val", levels=(0.6, 0.8))
    assert cal["n"] == 4 and cal["delta"] == 1.0 and cal["source"] == "toy val" and cal["uncertainty_scale"] == 1.0
    assert cal["quantiles"]["0.6"] == {"normalised": 1.0, "plain": 2.0}   # ceil(3.0) = 3rd; |err| 0, .5, 2, 6
    assert cal["quantiles"]["0.8"] == {"normalised": 2.0, "plain": 6.0}   # ceil(4.0) = 4th
    lower, upper = ev.conformal_interval([50.0, 60.0], [4.0, 0.0], cal, 0.6)
    assert lower.tolist() == [45.0, 59.0] and upper.tolist() == [55.0, 61.0]   # +- 1 * (u + 1)
    lower, upper = ev.conformal_interval([50.0, 60.0], [4.0, 0.0], cal, 0.6, plain=True)
    assert lower.tolist() == [48.0, 58.0] and upper.tolist() == [52.0, 62.0]
    metrics = ev.interval_metrics([50.0, 60.0], [54.0, 62.0], [4.0, 0.0], cal, 0.6)
    assert metrics["coverage"] == 0.5 and metrics["mean_width"] == 6.0   # 54 in [45, 55]; 62 not in [59, 61]
    assert metrics["plain_coverage"] == 0.5 and metrics["plain_mean_width"] == 4.0
    with pytest.raises(SystemExit, match="levels 0.6, 0.8 only; add --calibrate-on calibration"):
        ev.calibration_for(0.9, cal, "toy.pt")


def test_uncertainty_scale_by_hand():
    """u in years: scaled by mean |error| / mean u of the calibration images, before the conformal scores."""
    pred, target, unc = [10.0, 20.0, 30.0, 40.0], [12.0, 14.0, 30.5, 40.0], [1.0, 2.0, -0.5, 3.0]
    cal = ev.calibrate(pred, target, unc, "toy calibration", levels=(0.6,))
    scale = (2 + 6 + 0.5 + 0) / (1 + 2 + 0 + 3)
    assert cal["uncertainty_scale"] == pytest.approx(scale, rel=1e-12)
    # scores 2 / (scale + 1), 6 / (2 scale + 1), 0.5 / 1, 0: the 3rd smallest (ceil(5 * 0.6)) is 2 / (scale + 1)
    assert cal["quantiles"]["0.6"]["normalised"] == pytest.approx(2 / (scale + 1), rel=1e-12)
    assert ev.uncertainty_in_years([2.0, 0.0], cal).tolist() == pytest.approx([2 * scale, 0.0], rel=1e-12)
    assert ev.uncertainty_in_years([2.0], {"quantiles": {}}).tolist() == [2.0]   # a calibration before the scale
    # a model without feedback (u = 0): scale 1, the plain interval scaled by 1 / delta
    assert ev.calibrate(pred, target, [0.0] * 4, "toy", levels=(0.6,))["uncertainty_scale"] == 1.0


def test_uncertainty_calibration_by_hand():
    """mean u / MAE and the reliability table over equal-count bins of u, by hand."""
    u = [4.0, 1.0, 3.0, 2.0, 5.0, 6.0]
    pred, true = [0.0] * 6, [3.0, 1.0, 1.0, 2.0, 9.0, 2.0]   # |error| 3, 1, 1, 2, 9, 2 -> MAE 3
    got = ev.uncertainty_calibration(u, pred, true, bins=3)
    assert got["mean_uncertainty_over_mae"] == pytest.approx(3.5 / 3)
    # sorted by u: (1, err 1), (2, err 2) | (3, err 1), (4, err 3) | (5, err 9), (6, err 2)
    assert got["bins"] == [{"n": 2, "mean_uncertainty": 1.5, "mean_abs_error": 1.5},
                           {"n": 2, "mean_uncertainty": 3.5, "mean_abs_error": 2.0},
                           {"n": 2, "mean_uncertainty": 5.5, "mean_abs_error": 5.5}]


def test_coverage_on_exchangeable_data_within_binomial_tolerance():
    """Heteroscedastic errors whose scale the uncertainty knows (and a model whose uncertainty is noise):
    each of R repetitions calibrates on n = 19 points and tests one new point. For continuous scores the
    coverage is exactly ceil((n + 1) level) / (n + 1) = 0.9 (Lei et al. 2018), so the hit count is
    Binomial(R, 0.9); 4 standard deviations of it is the tolerance."""
    rng = np.random.default_rng(0)
    repetitions, n, level = 4000, 19, 0.9
    sd = math.sqrt(repetitions * level * (1 - level))
    for informative in (True, False):
        hits, widths, plain_widths = 0, [], []
        for _ in range(repetitions):
            scale = rng.uniform(0.5, 10.0, n + 1)
            target = 40 + scale * rng.standard_normal(n + 1)
            pred = np.full(n + 1, 40.0)
            unc = scale if informative else rng.uniform(0.5, 10.0, n + 1)
            cal = ev.calibrate(pred[:n], target[:n], unc[:n], "synthetic", levels=(level,))
            m = ev.interval_metrics(pred[n:], target[n:], ev.uncertainty_in_years(unc[n:], cal), cal, level)
            hits += m["coverage"]
            widths.append(m["mean_width"])
            plain_widths.append(m["plain_mean_width"])
        assert abs(hits - level * repetitions) < 4 * sd, (informative, hits)
        if informative:   # the normalised interval is narrower where the uncertainty ranks the error
            assert np.mean(widths) < 0.85 * np.mean(plain_widths)


# --------------------------------------------------------------------------- face crops by hand


def coordinate_image(width, height):
    """An RGB image whose pixel (x, y) is (x, y, 7): every crop says where it came from."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x, y, np.full_like(x, 7)], -1).astype(np.uint8))


def test_face_crop_by_hand():
    """An upright face: eyes 10 px apart at row 30, mouth 10 px below their midpoint (40, 30): the aligned
    box is 40 px wide (half side max(2 x 10, 1.8 x 10) = 20) about (40, 31), 1-based corners (21, 12) and
    (61, 52), 0-based (20, 11) and (60, 51). With margin 0.05 the crop's data.aligned_crop_size(40) = 44
    pixels span columns 18..62 and rows 9..53, 44/43 px apart, and the model sees the centre 40 from pixel
    2: columns 18 + 2 * 44/43 = 20.05 .. 18 + 41 * 44/43 = 59.95, rows 11.05 .. 50.95, which PIL's 8-bit
    bilinear interpolation of the coordinate image truncates."""
    image = coordinate_image(80, 60)
    face = data.Face((30, 20, 50, 45), ((35, 30), (45, 30), (40, 35), (36, 40), (44, 40)), 0.99)
    assert face.aligned_box() == [21, 12, 61, 12, 61, 52, 21, 52]
    crop = np.asarray(ev.face_crop(image, face, 40, margin=0.05), np.int64)
    assert crop.shape == (40, 40, 3)
    assert tuple(crop[0, 0, :2]) == (20, 11) and tuple(crop[39, 39, :2]) == (59, 50)
    assert tuple(crop[0, 39, :2]) == (59, 11) and tuple(crop[39, 0, :2]) == (20, 50)


# --------------------------------------------------------------------------- a trained run

AGES = [3, 9, 15, 22, 28, 35, 41, 47, 55, 62, 70, 78, 84, 90, 30, 60, 12, 66, 38, 81, 20, 50, 75, 5]
SPLITS = ["train"] * 12 + ["val"] * 8 + ["test"] * 4   # val: halved into val 4 and calibration 4
TINY = ["--depth", "1", "--width", "32", "--heads", "2", "--feedback-hidden", "32", "--batch-size", "4",
        "--epochs", "1", "--clip", "random"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A CSV dataset of 24 synthetic drawings (train 12 / val 4 / calibration 4 / test 4) and a tiny run."""
    root = tmp_path_factory.mktemp("faces_data")
    (root / "img").mkdir()
    rows = []
    for i, (age, split) in enumerate(zip(AGES, SPLITS)):
        Image.fromarray(data.render_synthetic(age, np.random.default_rng(i), 40)).save(root / "img" / f"{i:02d}.png")
        rows.append([f"img/{i:02d}.png", age, split])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "age", "split"]] + rows)
    out = tmp_path_factory.mktemp("faces_run")
    train.main(["--dataset", "csv", "--data-root", str(root / "labels.csv"), "--out", str(out), *TINY])
    return out / "best.pt", root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_stores_a_calibration_that_eval_reproduces(run, tmp_path, capsys):
    ckpt_path, root = run
    ckpt = torch.load(ckpt_path, weights_only=True)
    cal = ckpt["calibration"]
    assert cal["n"] == 4 and cal["source"] == "csv calibration" and list(cal["quantiles"]) == ["0.8", "0.9", "0.95"]
    assert cal["quantiles"]["0.9"]["normalised"] == math.inf   # 4 images are too few for 90%
    # the same from eval's own predictions on the calibration split, by hand: u in years has the mean |error|
    # there, and the quantile is the 4th smallest of 4 (ceil(5 * 0.8)) of |error| / (u + 1)
    ev.main(["--ckpt", str(ckpt_path), "--split", "calibration", "--interval", "0.8", "--out", str(tmp_path / "cal")])
    rows = read_csv(tmp_path / "cal" / "predictions.csv")
    err = [abs(float(r["predicted_age"]) - float(r["age"])) for r in rows]
    assert np.mean([float(r["uncertainty"]) for r in rows]) == pytest.approx(np.mean(err), abs=1e-3)
    scores = [e / (max(float(r["uncertainty"]), 0) + 1.0) for e, r in zip(err, rows)]
    assert cal["quantiles"]["0.8"]["normalised"] == pytest.approx(max(scores), rel=1e-3)
    assert cal["quantiles"]["0.8"]["plain"] == pytest.approx(max(err), rel=1e-4)
    assert "calibrated on csv calibration, these very images" in capsys.readouterr().err   # said, as it is
    # on test: coverage and width in metrics.json agree with the per-image intervals written
    metrics = ev.main(["--ckpt", str(ckpt_path), "--interval", "0.8", "--out", str(tmp_path / "test")])
    rows = read_csv(tmp_path / "test" / "predictions.csv")
    inside = [float(r["lower"]) <= float(r["age"]) <= float(r["upper"]) for r in rows]
    assert metrics["interval"]["coverage"] == pytest.approx(np.mean(inside))
    assert metrics["interval"]["mean_width"] == pytest.approx(
        np.mean([float(r["upper"]) - float(r["lower"]) for r in rows]), abs=1e-3)
    assert "80% interval coverage" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--interval 0.85: .* calibrated for levels 0.8, 0.9, 0.95 only"):
        ev.main(["--ckpt", str(ckpt_path), "--interval", "0.85", "--out", str(tmp_path / "x")])


def test_few_calibration_subjects_are_warned_of(run, capsys):
    """The run's calibration part holds 4 images (4 subjects): fewer than MIN_CALIBRATION_SUBJECTS, said."""
    ckpt_path, root = run
    model, _ = ev.load_model(ckpt_path)
    part = data.build_dataset("csv", root / "labels.csv", split="calibration", transform=ev.model_transform(model),
                              drop_unreadable=True)
    args = argparse.Namespace(dataset="csv", batch_size=4, workers=0, amp="off")
    calibration = train.calibrate_on_held_out(model, part, args, torch.device("cpu"))
    assert calibration["n"] == 4 and calibration["source"] == "csv calibration"
    assert "the calibration part holds 4 subject(s) (fewer than 30)" in capsys.readouterr().err


def test_calibrate_on_calibration_for_a_checkpoint_without_calibration(run, tmp_path, capsys):
    ckpt_path, _ = run
    ckpt = torch.load(ckpt_path, weights_only=True)
    stored = ckpt.pop("calibration")
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    metrics = ev.main(["--ckpt", str(old), "--out", str(tmp_path / "a")])
    assert "interval" not in metrics and "holds no calibration; add --calibrate-on calibration" in capsys.readouterr().err
    assert read_csv(tmp_path / "a" / "predictions.csv")[0]["lower"] == ""
    metrics = ev.main(["--ckpt", str(old), "--calibrate-on", "calibration", "--interval", "0.8",
                       "--out", str(tmp_path / "b")])
    assert metrics["interval"]["calibration_n"] == 4
    expected = ev.interval_metrics(  # the stored calibration gives the same intervals
        *[np.array([float(r[k]) for r in read_csv(tmp_path / "b" / "predictions.csv")])
          for k in ("predicted_age", "age", "uncertainty")], stored, 0.8)
    assert metrics["interval"]["coverage"] == expected["coverage"]
    assert metrics["interval"]["mean_width"] == pytest.approx(expected["mean_width"], rel=1e-4)
    metrics = ev.main(["--ckpt", str(old), "--calibrate-on", "calibration", "--interval", "0.75", "--out", str(tmp_path / "c")])
    assert metrics["interval"]["level"] == 0.75   # any level, when calibrating now


def test_predict_api_matches_the_command_line(run, tmp_path):
    ckpt_path, root = run
    ev.main(["--ckpt", str(ckpt_path), "--images", str(root / "img" / "16.png"), str(root / "img" / "03.png"),
             "--interval", "0.8", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "predictions.csv")
    assert [r["face"] for r in rows] == ["0", "0"]   # without --detect-faces: the whole image is the box
    assert [float(rows[0][k]) for k in ("x0", "y0", "x1", "y1")] == [0, 0, 40, 40]
    model, calibration = ev.load_model(ckpt_path)
    out = ev.predict_images(model, [Image.open(root / "img" / "16.png"), Image.open(root / "img" / "03.png")],
                            calibration, level=0.8)
    for i, row in enumerate(rows):
        for key, column in (("age", "predicted_age"), ("uncertainty", "uncertainty"), ("lower", "lower"),
                            ("upper", "upper")):
            assert getattr(out, key)[i] == pytest.approx(float(row[column]), abs=1e-3)
    one = ev.predict_images(model, Image.open(root / "img" / "03.png"))   # one image, no calibration
    assert one.age[0] == pytest.approx(out.age[1], abs=1e-4) and math.isnan(one.lower[0])


def test_tta_flip_is_the_mean_of_the_image_and_its_mirror():
    """predict_images(tta="flip") against predictions for the images and for their mirror images made by
    PIL, averaged by hand; a random ViT CLIP (position embeddings) sees a mirror image differently."""
    from model import CILFCIAE, CILFConfig
    torch.manual_seed(0)
    clip = clip_loader.CLIP(32, 32, 2, 64, 8, 16, 49408, 32, 2, 1)
    model = CILFCIAE(clip, CILFConfig(max_age=30.0, width=32, heads=2, feedback_hidden=32)).eval()
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    plain = ev.predict_images(model, photos)
    mirrored = ev.predict_images(model, [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in photos])
    flip = ev.predict_images(model, photos, tta="flip")
    for key in ("age", "uncertainty"):
        assert getattr(flip, key) == pytest.approx((getattr(plain, key) + getattr(mirrored, key)) / 2, abs=1e-5)
    for key in ("age", "uncertainty"):   # the mirror image changes both, so the mean is not either one
        assert np.abs(getattr(plain, key) - getattr(mirrored, key)).min() > 1e-3


def test_predict_api_raises_a_catchable_error_for_a_bad_file(tmp_path):
    """A library caller gets a ValueError it can catch (clip_loader.CheckpointError), not an exit."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for path, message in ((tmp_path / "missing.pt", "checkpoint not found"), (garbage, "garbage.pt: cannot be read")):
        with pytest.raises(clip_loader.CheckpointError, match=message) as error:
            ev.load_model(path)
        assert isinstance(error.value, ValueError)


# --------------------------------------------------------------------------- --detect-faces


def test_detect_faces_rows_no_face_and_a_corrupt_file(run, tmp_path, monkeypatch, capsys):
    """A stand-in detector (two faces in one photo, none in the other) so that the rows can be checked
    exactly; the real detector is tested below where facenet-pytorch is installed."""
    ckpt_path, root = run
    photos = tmp_path / "photos"
    photos.mkdir()
    coordinate_image(120, 90).save(photos / "a_two.png")
    Image.new("RGB", (50, 50), (90, 90, 90)).save(photos / "b_none.png")
    (photos / "c_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    crops = []

    def face(x0, y0, x1, y1):   # eyes a third of the way down the box, the mouth's corners at four fifths
        eyes, mouth = y0 + (y1 - y0) / 3, y0 + (y1 - y0) * 0.8
        landmarks = ((x0 + (x1 - x0) * 0.3, eyes), (x0 + (x1 - x0) * 0.7, eyes), ((x0 + x1) / 2, (eyes + mouth) / 2),
                     (x0 + (x1 - x0) * 0.35, mouth), (x0 + (x1 - x0) * 0.65, mouth))
        return data.Face((x0, y0, x1, y1), landmarks, 0.99)

    def detect(image):
        return [face(10.0, 20.0, 30.0, 40.0), face(60.0, 10.0, 100.0, 50.0)] if image.size == (120, 90) else []
    real_crop = ev.face_crop
    monkeypatch.setattr(ev, "face_detector", lambda device: detect)
    monkeypatch.setattr(ev, "face_crop", lambda image, found, resolution, margin: crops.append((found.box, margin))
                        or real_crop(image, found, resolution, margin))
    ev.main(["--ckpt", str(ckpt_path), "--images", str(photos), "--detect-faces", "--face-margin", "0.3",
             "--interval", "0.8", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert list(rows[0]) == ev.PHOTO_COLUMNS
    assert [(r["path"].rsplit("/", 1)[-1], r["face"]) for r in rows] == [("a_two.png", "0"), ("a_two.png", "1"),
                                                                          ("b_none.png", "-1")]
    assert [float(rows[1][k]) for k in ("x0", "y0", "x1", "y1")] == [60, 10, 100, 50]
    assert all(rows[2][k] == "" for k in ev.PHOTO_COLUMNS[2:])
    assert float(rows[0]["lower"]) <= float(rows[0]["predicted_age"]) <= float(rows[0]["upper"])
    assert crops == [((10.0, 20.0, 30.0, 40.0), 0.3), ((60.0, 10.0, 100.0, 50.0), 0.3)]
    # each face's prediction is the model's on its crop
    model, calibration = ev.load_model(ckpt_path)
    second = face(60.0, 10.0, 100.0, 50.0)
    crop = real_crop(Image.open(photos / "a_two.png").convert("RGB"), second, model.clip.visual.input_resolution, 0.3)
    assert ev.predict_images(model, crop).age[0] == pytest.approx(float(rows[1]["predicted_age"]), abs=1e-3)
    assert "2 image(s), 2 face(s), 1 unreadable skipped" in captured.out
    assert "1 unreadable image(s) left out" in captured.err and "c_broken.jpg" in captured.err


def test_missing_faces_extra_is_a_one_line_error(run, monkeypatch):
    ckpt_path, root = run
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)   # import facenet_pytorch now raises ImportError
    with pytest.raises(SystemExit) as stop:
        ev.main(["--ckpt", str(ckpt_path), "--images", str(root / "img"), "--detect-faces"])
    message = str(stop.value)
    assert "\n" not in message and 'pip install -e ".[faces]"' in message and "facenet-pytorch" in message
    with pytest.raises(SystemExit):
        ev.parse_args(["--ckpt", "x.pt", "--detect-faces"])   # faces are found in --images only
    for bad in (["--interval", "1"], ["--interval", "0"], ["--face-margin", "-0.1"]):
        with pytest.raises(SystemExit):
            ev.parse_args(["--ckpt", "x.pt", *bad])


def test_real_detector_on_a_photo_without_and_with_a_face():
    pytest.importorskip("facenet_pytorch")
    detect = ev.face_detector("cpu")
    assert detect(Image.new("RGB", (200, 160), (128, 128, 128))) == []
    assert detect(Image.new("RGB", (12, 9))) == []   # smaller than the smallest face MTCNN looks for
    skimage_data = pytest.importorskip("skimage.data")
    faces = detect(Image.fromarray(skimage_data.astronaut()))   # Eileen Collins, one face
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200   # around her face, not the flag or the helmet
    (eye_1, eye_2, nose, mouth_1, mouth_2) = faces[0].landmarks   # MTCNN's order: eyes, nose, mouth's corners
    assert eye_1[0] < nose[0] < eye_2[0] and max(eye_1[1], eye_2[1]) < nose[1] < min(mouth_1[1], mouth_2[1])
    assert all(x0 < x < x1 and y0 < y < y1 for x, y in faces[0].landmarks)
