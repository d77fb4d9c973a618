"""The unified benchmark's side of data.py: the aligned crop against OpenCV's affine warp (an independent
reimplementation of the benchmark's crop) on faces pasted rotated and scaled into larger images; the
oriented box from landmarks against the benchmark's rule written here from its description; a database
with all five splits (subject-exclusive, the published test folders, entries left out and counted,
malformed entries refused by index); FG-NET-style leave-one-folder-out; cross-dataset testing; the
dataset fingerprint; `python data.py align` with a stand-in detector."""
import cmath
import json
import math
import sys
import warnings

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms.functional import center_crop

import data

cv2 = pytest.importorskip("cv2")


# --------------------------------------------------------------------------- the crop


def pasted_face(rng, face_side=41, canvas=160):
    """(canvas image, face image, box): a face-like pattern pasted rotated and scaled at a random place;
    box: the benchmark's 1-based corners A, B, C, D of the face's corner pixel centres in the canvas."""
    face = Image.fromarray(data.render_synthetic(40, rng, face_side))
    scale, angle = rng.uniform(0.7, 1.8), rng.uniform(-1.0, 1.0)
    reach = face_side * scale / math.sqrt(2)
    centre = rng.uniform(reach + 2, canvas - reach - 2, 2)
    forward = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale
    # OpenCV's convention (pixel centres at integers): face pixel p -> centre + forward (p - middle)
    middle = (face_side - 1) / 2
    matrix = np.hstack([forward, (centre - forward @ [middle, middle])[:, None]])
    background = rng.integers(0, 256, (canvas, canvas, 3), dtype=np.uint8)
    warped = cv2.warpAffine(np.asarray(face), matrix, (canvas, canvas), flags=cv2.INTER_CUBIC)
    inside = cv2.warpAffine(np.full((face_side, face_side), 255, np.uint8), matrix, (canvas, canvas)) == 255
    image = np.where(inside[..., None], warped, background)
    corners = np.array([[0, 0], [face_side - 1, 0], [face_side - 1, face_side - 1], [0, face_side - 1]])
    box = (corners @ forward.T + matrix[:, 2]) + 1   # 1-based
    return Image.fromarray(image), face, box.flatten().tolist()


def opencv_crop(image, box, size, margin):
    """The benchmark's crop from its description: A, B, C pushed outward by the margin (a fraction of the
    width along A-B, of the height along A-D) go to (0, 0), (W-1, 0), (W-1, H-1); OpenCV, bilinear."""
    a, b, c, d = (np.array(box, np.float32).reshape(4, 2) - 1)
    width, height = b - a, d - a
    source = np.float32([a - margin * width - margin * height, b + margin * width - margin * height,
                         c + margin * width + margin * height])
    target = np.float32([[0, 0], [size - 1, 0], [size - 1, size - 1]])
    matrix = cv2.getAffineTransform(source, target)
    return cv2.warpAffine(np.asarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


@pytest.mark.parametrize("seed", range(6))
def test_crop_aligned_equals_opencv_and_lands_the_pasted_face(seed):
    rng = np.random.default_rng(seed)
    image, face, box = pasted_face(rng)
    for size, margin in ((50, 0.05), (281, 0.05), (41, 0.0), (64, 0.3)):
        ours = np.asarray(data.crop_aligned(image, box, size, margin), np.float64)
        reference = opencv_crop(image, box, size, margin).astype(np.float64)
        assert ours.shape == (size, size, 3)
        assert np.abs(ours - reference).mean() < 1.0, (size, margin)   # interpolation rounding aside
    # with no margin at the face's own size the crop is the face again (two resamplings apart), and a crop
    # one pixel off is much further from it
    crop = np.asarray(data.crop_aligned(image, box, 41, margin=0.0), np.float64)
    shifted = np.asarray(data.crop_aligned(image, np.array(box) + 1.0, 41, margin=0.0), np.float64)
    truth = np.asarray(face, np.float64)
    inner = (slice(3, -3), slice(3, -3))
    assert np.abs(crop - truth)[inner].mean() < 6
    assert np.abs(shifted - truth)[inner].mean() > np.abs(crop - truth)[inner].mean() + 3


def test_crop_margin_places_the_box_inside_the_crop():
    """On a coordinate image: the box's corners land at margin / (1 + 2 margin) of the crop's side."""
    y, x = np.mgrid[0:200, 0:200]
    image = Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))
    box = [51, 41, 151, 41, 151, 141, 51, 141]   # 1-based: pixels 50..150 x 40..140
    crop = np.asarray(data.crop_aligned(image, box, 121, margin=0.1), np.int64)
    # 121 px span 100 * 1.2 = 120 pixel steps: one output pixel per input pixel, from (40, 30)
    assert tuple(crop[0, 0, :2]) == (40, 30) and tuple(crop[120, 120, :2]) == (160, 150)
    assert tuple(crop[10, 10, :2]) == (50, 40)   # corner A at 0.1 / 1.2 of 120
    assert data.aligned_crop_size(256) == 281 and data.aligned_crop_size(32) == 35


# --------------------------------------------------------------------------- the box from landmarks


def box_by_the_rule(eye_a, eye_b, mouth):
    """The benchmark's rule in its own words, on complex numbers (column + i row): centre = the eyes'
    midpoint moved a tenth toward the mouth; half side = max(2.0 eye distance, 1.8 eyes-to-mouth); the
    horizontal axis along the eye vector plus the eyes-to-mouth vector turned a quarter turn, the eye
    vector pointing from the image-left eye of an upright face to the other; corners A (top left), B, C,
    D; 1-based, truncated toward zero."""
    a, b, m = (complex(*p) for p in (eye_a, eye_b, mouth))
    middle = (a + b) / 2
    down = m - middle
    across = down * -1j   # a quarter turn: for a mouth straight below, pointing to the image's right
    eyes = a - b
    if (eyes * across.conjugate()).real < 0:
        eyes = -eyes
    half = max(2.0 * abs(eyes), 1.8 * abs(down))
    unit = (eyes + across) / abs(eyes + across) * half
    centre = middle + 0.1 * down
    corners = [centre + unit * k for k in (-1 - 1j, 1 - 1j, 1 + 1j, -1 + 1j)]
    return [math.trunc(v + 1) for z in corners for v in (z.real, z.imag)]


def test_aligned_box_of_an_upright_face_by_hand():
    # eyes 20 apart at row 50, mouth 20 below their midpoint: half side max(40, 36) = 40 about (50, 52)
    assert data.aligned_box((60, 50), (40, 50), (50, 70)) == [11, 13, 91, 13, 91, 93, 11, 93]
    assert data.aligned_box((40, 50), (60, 50), (50, 70)) == [11, 13, 91, 13, 91, 93, 11, 93]


def test_aligned_box_equals_the_rule_on_random_landmarks():
    rng = np.random.default_rng(0)
    for _ in range(500):
        distance, turn = rng.uniform(5, 120), rng.uniform(-1.4, 1.4)
        middle = rng.uniform(-50, 500, 2)
        eye_line = distance / 2 * np.array([math.cos(turn), math.sin(turn)])
        below = np.array([-math.sin(turn), math.cos(turn)]) * distance * rng.uniform(0.6, 1.6)
        mouth = middle + below + rng.normal(0, distance * 0.1, 2)
        left, right = middle + eye_line + rng.normal(0, 1, 2), middle - eye_line + rng.normal(0, 1, 2)
        expected = box_by_the_rule(right, left, mouth)
        assert data.aligned_box(left, right, mouth) == expected
        assert data.aligned_box(right, left, mouth) == expected   # eyes in the other order


def test_aligned_box_turns_with_the_face():
    eyes = [np.array([60.0, 50.0]), np.array([40.0, 50.0])]
    mouth, centre = np.array([50.0, 70.0]), np.array([50.0, 50.0])
    turn = cmath.exp(0.5j)
    rotated = [centre + [((complex(*(p - centre))) * turn).real, ((complex(*(p - centre))) * turn).imag]
               for p in (*eyes, mouth)]
    box = np.array(data.aligned_box(*rotated), float).reshape(4, 2)
    edge = box[1] - box[0]   # A -> B follows the eye line
    assert math.atan2(edge[1], edge[0]) == pytest.approx(0.5, abs=0.03)


# --------------------------------------------------------------------------- databases


def write_database(root, entries, name="db.json"):
    path = root / name
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def entry(i, folder, subject=None, age=30, box=(2, 2, 15, 2, 15, 15, 2, 15), path=None, database="TEST"):
    return {"img_path": path or f"img/{i:03d}.png", "id_num": i if subject is None else subject, "age": age,
            "gender": "U", "database": database, "folder": folder, "aligned_bbox": list(box) if box else box}


def write_images(root, entries):
    for e in entries:
        target = root / e["img_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (len(e["img_path"]) * 7 % 255, 90, 40)).save(target)


def build(root, database, split="train", fold=0, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.build_dataset("facebase", root, split=split, fold=fold, database=database, crop_size=20,
                                     **options)
    return dataset, [str(w.message) for w in caught]


def folders_of(dataset, folder_of):
    return {folder_of[s.path] for s in dataset.samples}


# The five splits as the benchmark publishes them (train / val / test folders), typed in from its table
PUBLISHED = [([0, 1, 2, 3, 4, 5], [6, 7], [8, 9]), ([2, 3, 4, 5, 6, 7], [8, 9], [0, 1]),
             ([4, 5, 6, 7, 8, 9], [0, 1], [2, 3]), ([5, 6, 7, 8, 9, 0], [1, 2], [3, 4]),
             ([6, 7, 8, 9, 0, 1], [2, 3], [4, 5])]


def test_five_splits_subject_exclusive_published_folders_and_left_out_entries(tmp_path):
    entries = [entry(i, folder=(i // 2) % 10, subject=i // 2) for i in range(80)]   # 40 subjects, 2 images
    write_images(tmp_path, entries)
    entries += [entry(80, 0, subject=100, age=-1), entry(81, 3, subject=101, age=-1),
                entry(82, 5, subject=102, path="img/missing.png"), entry(83, 7, subject=103, box=[]),
                {**entry(84, 2, subject=104), "aligned_bbox": None, "bbox": [1, 1, 9, 1, 9, 9, 1, 9]}]
    write_images(tmp_path, [entries[80], entries[81], entries[83], entries[84]])
    database = write_database(tmp_path, entries)
    folder_of = {str(tmp_path / e["img_path"]): e["folder"] for e in entries}
    tested = []
    for index, (train, val, test) in enumerate(PUBLISHED):
        parts = {split: build(tmp_path, database, split, index)[0] for split in ("train", "val", "calibration", "test")}
        # the published val folders, their subjects halved into val and calibration (data.split_validation)
        assert [sorted(folders_of(parts[s], folder_of)) for s in ("train", "test")] == [sorted(train), sorted(test)]
        assert sorted(folders_of(parts["val"], folder_of) | folders_of(parts["calibration"], folder_of)) == sorted(val)
        subjects = [{s.subject for s in parts[split].samples} for split in ("train", "val", "calibration", "test")]
        assert sum(map(len, subjects)) == len(set().union(*subjects))   # no subject in two splits
        assert sum(len(p) for p in parts.values()) == 80
        tested += test
    # as published, folders 3 and 4 are tested twice and 6 and 7 never: the benchmark's own table
    assert sorted(tested) == [0, 1, 2, 3, 3, 4, 4, 5, 8, 9]
    dataset, messages = build(tmp_path, database, "test", 0)
    assert {reason: len(paths) for reason, paths in dataset.left_out.items()} == \
        {"unknown age (-1)": 2, "no aligned_bbox": 2, "image not found": 1}
    assert any("left out 2 entries" in m and "unknown age" in m and "img/080.png" in m for m in messages)
    assert any("left out 1 entries" in m and "image not found" in m and "img/missing.png" in m for m in messages)
    # the sample is the aligned crop
    assert dataset.image(0).size == (20, 20)
    with pytest.raises(ValueError, match="--split-index must be 0..4"):
        build(tmp_path, database, "train", 5)


@pytest.mark.parametrize("bad, message", [
    ({"aligned_bbox": [1, 2, 3, 4, 5, 6, 7]}, "entry 3 \\(img/003.png\\): aligned_bbox .* is not 8 numbers"),
    ({"aligned_bbox": [1, 2, 3, 4, 5, 6, 7, "8"]}, "entry 3 \\(img/003.png\\): aligned_bbox"),
    ({"folder": "3"}, "entry 3 \\(img/003.png\\): folder '3' is not a folder number"),
    ({"folder": 12}, "entry 3 \\(img/003.png\\): folder 12 lies outside"),
    ({"age": 130}, "entry 3 \\(img/003.png\\): age 130"),
    ({"id_num": 1}, "entry 3 \\(img/003.png\\): subject TEST:1 is in folder 3 here and in folder 1"),
])
def test_malformed_entry_is_refused_with_its_index(tmp_path, bad, message):
    entries = [entry(i, folder=i % 10) for i in range(20)]
    write_images(tmp_path, entries)
    entries[3].update(bad)
    with pytest.raises(data.DatasetError, match=message):
        build(tmp_path, write_database(tmp_path, entries))


def test_database_file_errors_name_the_file(tmp_path):
    (tmp_path / "broken.json").write_text('[{"img_path": "a.png",\n', encoding="utf-8")
    with pytest.raises(data.DatasetError, match="broken.json:2: not JSON"):
        build(tmp_path, tmp_path / "broken.json")
    with pytest.raises(data.DatasetError, match="a JSON list of entries, not a dict"):
        build(tmp_path, write_database(tmp_path, {"img_path": "a.png"}))
    with pytest.raises(data.DatasetError, match="entry 0: not an object with an img_path"):
        build(tmp_path, write_database(tmp_path, [{"age": 3}]))


def test_three_folder_database_has_one_split(tmp_path):
    entries = [entry(i, folder=i % 3) for i in range(12)]
    write_images(tmp_path, entries)
    database = write_database(tmp_path, entries)
    folder_of = {str(tmp_path / e["img_path"]): e["folder"] for e in entries}
    assert [folders_of(build(tmp_path, database, s)[0], folder_of) for s in ("train", "val", "test")] == \
        [{0}, {1}, {2}]
    with pytest.raises(ValueError, match="single split: --split-index must be 0"):
        build(tmp_path, database, "train", 1)


def test_leave_one_folder_out_and_whole_database_testing(tmp_path):
    """FG-NET style: folders 1..20, one subject each, three images each. --split-index k tests folder k;
    val is a seeded tenth of the other folders, train the rest; --split all takes every entry."""
    entries = [entry(i, folder=i // 3 + 1, subject=f"s{i // 3 + 1}", database="FGNET") for i in range(60)]
    write_images(tmp_path, entries)
    database = write_database(tmp_path, entries)
    folder_of = {str(tmp_path / e["img_path"]): e["folder"] for e in entries}
    for held_out in (1, 7, 20):
        splits = ("train", "val", "calibration", "test")
        parts = [folders_of(build(tmp_path, database, s, held_out)[0], folder_of) for s in splits]
        assert parts[3] == {held_out} and len(parts[1]) == len(parts[2]) == 1 and len(parts[0]) == 17
        assert set().union(*parts) == set(range(1, 21)) and sum(map(len, parts)) == 20
        assert parts == [folders_of(build(tmp_path, database, s, held_out)[0], folder_of) for s in splits]   # seeded
    with pytest.raises(ValueError, match="must name a folder, not 0"):
        build(tmp_path, database, "test", 0)
    assert len(build(tmp_path, database, "all", 0)[0]) == 60


def test_several_databases_are_tested_whole(tmp_path):
    first = [entry(i, folder=i % 10) for i in range(20)]
    second = [entry(i, folder=i % 3, path=f"other/{i}.png", database="OTHER") for i in range(9)]
    write_images(tmp_path, first + second)
    paths = [write_database(tmp_path, first, "a.json"), write_database(tmp_path, second, "b.json")]
    everything, _ = build(tmp_path, paths, "all")
    assert len(everything) == 29 and len({s.subject for s in everything.samples}) == 29   # ids namespaced
    with pytest.raises(ValueError, match="2 databases: several are tested whole"):
        build(tmp_path, paths, "test")
    # the same image listed by both is caught by the split integrity check
    write_database(tmp_path, second + [entry(99, 0, path="img/000.png", database="OTHER")], "b.json")
    with pytest.raises(data.DatasetError, match="are the same image"):
        build(tmp_path, paths, "all")


def test_fingerprint_covers_the_box(tmp_path):
    entries = [entry(i, folder=i % 10) for i in range(20)]
    write_images(tmp_path, entries)
    database = write_database(tmp_path, entries)
    before = data.index_entries(build(tmp_path, database, "all")[0], "all")
    entries[4]["aligned_bbox"] = [3, 2, 15, 2, 15, 15, 3, 15]
    write_database(tmp_path, entries)
    after = data.index_entries(build(tmp_path, database, "all")[0], "all")
    assert data.fingerprint(before) != data.fingerprint(after)
    assert "1 file(s) relabelled (e.g. img/004.png)" == data.describe_change(before, after)


# --------------------------------------------------------------------------- python data.py align


def stand_in_face(centre, eye_distance=20.0):
    x, y = centre
    half = eye_distance / 2
    landmarks = ((x - half, y), (x + half, y), (x, y + 8), (x - 8, y + 20), (x + 8, y + 20))
    return data.Face((x - 25, y - 30, x + 25, y + 35), landmarks, 0.99)


def test_align_folder_writes_crops_manifest_and_counts_faceless_images(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    Image.new("RGB", (120, 100), (200, 10, 10)).save(raw / "sub" / "two.jpg")
    Image.new("RGB", (80, 80), (10, 10, 200)).save(raw / "none.png")
    (raw / "broken.jpg").write_bytes(b"not a jpeg")
    faces = {(120, 100): [stand_in_face((20, 30)), stand_in_face((62, 48))], (80, 80): []}
    counts = data.align_folder(raw, tmp_path / "aligned", size=48, detect=lambda image: faces[image.size])
    assert counts["images"] == 3 and counts["aligned"] == 1 and counts["no face"] == ["none.png"]
    assert [path for path, _ in counts["unreadable"]] == ["broken.jpg"]
    crop = Image.open(tmp_path / "aligned" / "sub" / "two.jpg")
    assert crop.size == (48, 48)
    with open(tmp_path / "aligned" / "manifest.csv", encoding="utf-8") as handle:
        rows = list(__import__("csv").DictReader(handle))
    assert [r["path"] for r in rows] == ["none.png", "sub/two.jpg"]
    picked = stand_in_face((62, 48))   # the face nearer the centre (60, 50)
    assert rows[1]["aligned_bbox"] == " ".join(map(str, picked.aligned_box())) and rows[1]["faces_found"] == "2"
    assert rows[0]["aligned_bbox"] == "" and rows[0]["faces_found"] == "0"
    with pytest.raises(ValueError, match="lies inside --data-root"):
        data.align_folder(raw, raw / "out", detect=lambda image: [])


def test_align_command_without_the_faces_extra_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)   # import facenet_pytorch now raises ImportError
    (tmp_path / "raw").mkdir()
    with pytest.raises(SystemExit) as stop:
        data.main(["align", "--data-root", str(tmp_path / "raw"), "--out", str(tmp_path / "aligned")])
    message = str(stop.value)
    assert "\n" not in message and 'pip install -e ".[faces]"' in message


# --------------------------------------------------------------------------- train.py and eval.py


TINY = ["--depth", "1", "--width", "32", "--heads", "2", "--feedback-hidden", "32", "--batch-size", "4",
        "--epochs", "1", "--clip", "random"]


def pasted_database(root, name, n, folders, database):
    """n drawings pasted into canvases with their boxes, in `folders` in turn; returns the JSON path."""
    entries = []
    for i in range(n):
        rng = np.random.default_rng([i, len(name)])
        image, _, box = pasted_face(rng, face_side=37, canvas=120)
        path = f"{database}/{i:03d}.png"
        (root / database).mkdir(parents=True, exist_ok=True)
        image.save(root / path)
        entries.append({"img_path": path, "id_num": i, "age": int(rng.integers(0, 90)), "database": database,
                        "folder": folders[i % len(folders)], "aligned_bbox": [round(v, 2) for v in box]})
    return write_database(root, entries, name)


@pytest.fixture(scope="module")
def facebase_run(tmp_path_factory):
    import train
    root = tmp_path_factory.mktemp("facebase_data")
    database = pasted_database(root, "demo.json", 20, list(range(10)), "DEMO")
    other = pasted_database(root, "other.json", 6, [0, 1, 2], "OTHER")
    out = tmp_path_factory.mktemp("facebase_run")
    train.main(["--dataset", "facebase", "--database", str(database), "--data-root", str(root), "--split-index", "1",
                "--out", str(out), *TINY])
    return out, root, database, other


def test_train_and_eval_crop_the_aligned_box(facebase_run, tmp_path):
    import eval as ev
    out, root, database, other = facebase_run
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["fold"] == 1 and config["train"]["crop_margin"] == data.ALIGN_MARGIN
    assert config["train"]["dataset_options"] == {"database": [str(database)], "margin": data.ALIGN_MARGIN,
                                                  "crop_size": 35}   # the demo CLIP's 32 enlarged by 5% a side
    metrics = ev.main(["--ckpt", str(out / "best.pt"), "--out", str(tmp_path / "test")])
    assert metrics["split"] == "test" and metrics["n"] == 4   # split 1 tests folders 0 and 1
    # eval.py's predictions are the model's on the centre of each aligned crop
    model, _ = ev.load_model(out / "best.pt")
    with open(tmp_path / "test" / "predictions.csv", newline="") as handle:
        rows = list(__import__("csv").DictReader(handle))
    entries = {str(root / e["img_path"]): e for e in json.loads(database.read_text())}
    views = [center_crop(data.crop_aligned(Image.open(r["path"]).convert("RGB"), entries[r["path"]]["aligned_bbox"],
                                           35), 32) for r in rows]
    assert ev.predict_images(model, views).age == pytest.approx([float(r["predicted_age"]) for r in rows], abs=1e-3)


def test_cross_dataset_testing_and_its_refusal_on_the_training_database(facebase_run, tmp_path):
    import eval as ev
    out, root, database, other = facebase_run
    metrics = ev.main(["--ckpt", str(out / "best.pt"), "--database", str(other), "--split", "all",
                       "--out", str(tmp_path / "other")])
    assert metrics["n"] == 6 and metrics["split"] == "all"
    copy = tmp_path / "renamed.json"
    copy.write_bytes(database.read_bytes())
    for databases in ([str(database)], [str(other), str(copy)]):
        with pytest.raises(SystemExit, match="the run trained on this database"):
            ev.main(["--ckpt", str(out / "best.pt"), "--database", *databases, "--split", "all"])
    with pytest.raises(SystemExit, match="the run trained on this database"):
        ev.main(["--ckpt", str(out / "best.pt"), "--split", "all"])   # the run's own, by default


def test_facebase_options_are_checked(capsys):
    import train
    for argv, message in ((["--dataset", "facebase", "--data-root", "x"], "needs --database"),
                          (["--dataset", "csv", "--data-root", "x", "--database", "a.json"], "is for --dataset facebase"),
                          (["--dataset", "csv", "--data-root", "x", "--crop-margin", "0.1"], "is for --dataset facebase"),
                          (["--dataset", "facebase", "--data-root", "x", "--database", "a.json", "b.json"],
                           "a run trains on one database")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert message in capsys.readouterr().err
