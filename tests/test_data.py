"""data.py: every dataset layout parsed from fixture trees of tiny images under the real file names,
split sizes, disjointness, subject exclusivity, FG-NET folds, determinism, every bad-input case, image
modes, EXIF rotation, large images, transforms, the synthetic data and the loader helper."""
import csv
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import clip_loader
import data


def _image(path, size=(8, 8), color=(120, 80, 60), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt or "JPEG")
    return path


def _ages(dataset):
    return sorted(s.age for s in dataset.samples)


def _paths(dataset):
    return {s.path for s in dataset.samples}


def _subjects(dataset):
    return {s.subject for s in dataset.samples}


def _check_partition(name, root, expected_total, **kwargs):
    """train/val/calibration/test are disjoint, cover 'all', and are identical when rebuilt with the same seed."""
    parts = {split: data.build_dataset(name, root, split=split, **kwargs) for split in data.SPLITS}
    union = set()
    for split in ("train", "val", "calibration", "test"):
        assert not union & _paths(parts[split])
        union |= _paths(parts[split])
        again = data.build_dataset(name, root, split=split, **kwargs)
        assert [s.path for s in again.samples] == [s.path for s in parts[split].samples]
    assert union == _paths(parts["all"]) and len(union) == expected_total
    return parts


def _check_subject_exclusive(parts):
    seen = set()
    for split in ("train", "val", "calibration", "test"):
        subjects = _subjects(parts[split])
        assert None not in subjects and not seen & subjects
        seen |= subjects


# --------------------------------------------------------------------------- utkface

UTK_MALFORMED_BUT_AGED = [  # the release's oddities: the first field is still the age
    "61_1_20170109142408075.jpg.chip.jpg",  # race field missing
    "53__0_20170116184028385.jpg.chip.jpg",  # double underscore
    "24_0_1_20170116220224657 .jpg.chip.jpg",  # space before .jpg
    "55_0_0_20170116232725357jpg.chip.jpg",  # missing dot
]
UTK_UNUSABLE = ["abc_0_0_20170116232725357.jpg.chip.jpg", "150_0_0_20170116232725357.jpg.chip.jpg",
                "_0_0_20170116232725357.jpg.chip.jpg"]


def _utkface(root, n_regular=16):
    names = [f"{a}_{a % 2}_{a % 5}_2017011617452{a:04d}.jpg.chip.jpg" for a in range(1, n_regular + 1)]
    for i, name in enumerate(names + UTK_MALFORMED_BUT_AGED + UTK_UNUSABLE):
        _image(root / f"part{i % 2 + 1}" / name)
    # the in-the-wild original of an aligned crop: the same photo, kept once (the aligned one)
    _image(root / "wild" / names[0].replace(".chip.jpg", ""))
    return n_regular + len(UTK_MALFORMED_BUT_AGED)


def test_utkface_parses_ages_skips_unusable_names_and_splits_images(tmp_path):
    total = _utkface(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 3 file\(s\).*abc_0_0"):
        everything = data.build_dataset("utkface", tmp_path, split="all")
    assert len(everything) == total and len(everything.ignored) == 3
    assert _ages(everything) == sorted(list(range(1, 17)) + [61, 53, 24, 55])
    assert all(".chip." in s.path for s in everything.samples)  # the aligned copy wins
    assert all(s.subject is None and s.age_std is None for s in everything.samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = _check_partition("utkface", tmp_path, total)
        other = data.build_dataset("utkface", tmp_path, split="test", seed=1)
    assert [len(parts[s]) for s in ("train", "val", "calibration", "test")] == [16, 1, 1, 2]  # 80/10/10 of 20
    assert _paths(other) != _paths(parts["test"])


# --------------------------------------------------------------------------- fgnet

FGNET = {"001": ["001A02.JPG", "001a10.jpg", "001A43a.JPG", "001A43b.JPG"],
         "002": ["002A05.jpg", "002A18.JPG"], "003": ["003A30.jpg"], "004": ["004A30.jpg", "004a61.JPG"],
         "005": ["005A07.JPG"], "010": ["010A00.jpg", "010A01.jpg"]}


def test_fgnet_leave_one_person_out(tmp_path):
    for names in FGNET.values():
        for name in names:
            _image(tmp_path / "images" / name)
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "001a02.pts").write_text("not an image")  # landmark files are ignored
    everything = data.build_dataset("fgnet", tmp_path, split="all")
    assert len(everything) == 12 and not everything.ignored
    ages = {s.path.rsplit("/", 1)[1]: (s.subject, s.age) for s in everything.samples}
    assert ages["001A43a.JPG"] == ("001", 43.0) and ages["001a10.jpg"] == ("001", 10.0)
    assert ages["010A00.jpg"] == ("010", 0.0)
    subjects = sorted(FGNET)
    test_subjects = []
    for fold, subject in enumerate(subjects):
        parts = _check_partition("fgnet", tmp_path, 12, fold=fold)
        assert _subjects(parts["test"]) == {subject} and len(parts["test"]) == len(FGNET[subject])
        assert len(_subjects(parts["val"])) == 1  # 10% of the 5 other subjects, at least one
        _check_subject_exclusive(parts)
        test_subjects.append(subject)
    assert test_subjects == subjects  # one fold per person, in sorted order
    with pytest.raises(ValueError, match="6 folds"):
        data.build_dataset("fgnet", tmp_path, split="test", fold=6)


# --------------------------------------------------------------------------- morph2

def _morph(root, n_subjects=20):
    total = 0
    for s in range(n_subjects):
        for p in range(1 + s % 3):
            picture = f"{p}" if s % 2 else f"{p:02d}"  # one or two digits
            _image(root / "Album2" / f"{100000 + s * 37:06d}_{picture}{'MF'[s % 2]}{20 + s + p}.JPG")
            total += 1
    return total


def test_morph2_protocols(tmp_path):
    total = _morph(tmp_path)
    everything = data.build_dataset("morph2", tmp_path, split="all")
    first = [s for s in everything.samples if s.path.endswith("100000_00M20.JPG")]
    assert len(everything) == total and first[0].subject == "100000" and first[0].age == 20
    parts = _check_partition("morph2", tmp_path, total, protocol="random")
    assert [len(parts[s]) for s in ("train", "val", "calibration", "test")] == [total - 8, 2, 2, 4]  # 80/10/10 of 39
    test_subjects = []
    for fold in range(data.MORPH_FOLDS):
        parts = _check_partition("morph2", tmp_path, total, fold=fold)
        _check_subject_exclusive(parts)
        assert len(_subjects(parts["test"])) == 4  # 20 subjects in 5 folds
        assert len(_subjects(parts["val"])) == len(_subjects(parts["calibration"])) == 1  # 10% of the 16 others, halved
        test_subjects += _subjects(parts["test"])
    assert sorted(test_subjects) == sorted(_subjects(everything))  # the folds partition the subjects
    with pytest.raises(ValueError, match="5 folds"):
        data.build_dataset("morph2", tmp_path, fold=5)
    with pytest.raises(ValueError, match="unknown protocol"):
        data.build_dataset("morph2", tmp_path, protocol="subject10fold")
    with pytest.raises(ValueError, match="single split"):
        data.build_dataset("morph2", tmp_path, protocol="random", fold=1)


# --------------------------------------------------------------------------- cacd and agedb

CACD_NAMES = {"Madonna": 4, "50_Cent": 3, "Jean_Claude_Van_Damme": 3, "Penélope_Cruz": 2,
              "Shaquille_O'Neal": 2, "Robert_Downey_Jr.": 2, "Jay-Z": 2, "Zoë_Saldaña": 2,
              "Ashley_Olsen": 2, "Matt_Damon": 2}


def test_cacd_names_and_subject_exclusive_split(tmp_path):
    for i, (person, count) in enumerate(CACD_NAMES.items()):
        for j in range(count):
            _image(tmp_path / f"{30 + i}_{person}_{j + 1:04d}.jpg")
    everything = data.build_dataset("cacd", tmp_path, split="all")
    assert _subjects(everything) == set(CACD_NAMES)
    cent = sorted(s.age for s in everything.samples if s.subject == "50_Cent")
    assert cent == [31.0] * 3  # the leading 50 of the name is not the age
    parts = _check_partition("cacd", tmp_path, 24)
    _check_subject_exclusive(parts)
    # 80/10/10 of people; one validation subject: the calibration part is empty
    assert [len(_subjects(parts[s])) for s in ("train", "val", "calibration", "test")] == [8, 1, 0, 1]


def test_agedb_names_with_trailing_space_are_one_subject(tmp_path):
    names = ["0_MariaCallas_35_f.jpg", "1_AaronEckhart _43_m.jpg", "2_AaronEckhart_30_m.jpg",
             "3_Zoë Kravitz_20_f.jpg", "4_Zoë Kravitz _25_f.JPG"] + \
            [f"{10 + i}_Person{i}_{20 + i}_{'mf'[i % 2]}.jpg" for i in range(8)]
    for name in names:
        _image(tmp_path / name)
    everything = data.build_dataset("agedb", tmp_path, split="all")
    eckhart = sorted(s.age for s in everything.samples if s.subject == "AaronEckhart")
    assert eckhart == [30.0, 43.0] and len(_subjects(everything)) == 11
    assert sorted(s.age for s in everything.samples if s.subject == "Zoë Kravitz") == [20.0, 25.0]
    _check_subject_exclusive(_check_partition("agedb", tmp_path, len(names)))


# --------------------------------------------------------------------------- appa-real

def _appa(root, rows_per_split=3):
    header = ["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"]
    for k, folder in enumerate(("train", "valid", "test")):
        rows = []
        for i in range(rows_per_split):
            name = f"{k * 100 + i:06d}.jpg"
            _image(root / folder / name)
            if i != 0:  # the first image of each split lacks its aligned crop
                _image(root / folder / (name + "_face.jpg"))
            rows.append([name, "38", f"{20.5 + k * 10 + i}", f"{3.25 + i}", f"{22 + k * 10 + i}"])
        with open(root / f"gt_avg_{folder}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([header] + rows)


def test_appa_real_official_splits_face_crops_and_age_targets(tmp_path):
    _appa(tmp_path)
    val = data.build_dataset("appa-real", tmp_path, split="val").samples   # the official valid split, halved
    val = sorted(val + data.build_dataset("appa-real", tmp_path, split="calibration").samples, key=lambda s: s.path)
    assert [s.path.rsplit("/", 2)[1:] for s in val] == [
        ["valid", "000100.jpg"], ["valid", "000101.jpg_face.jpg"], ["valid", "000102.jpg_face.jpg"]]
    assert [(s.age, s.age_std) for s in val] == [(30.5, 3.25), (31.5, 4.25), (32.5, 5.25)]
    real = data.build_dataset("appa-real", tmp_path, split="test", age_target="real")
    assert [(s.age, s.age_std) for s in real.samples] == [(42.0, None), (43.0, None), (44.0, None)]
    assert len(data.build_dataset("appa-real", tmp_path, split="all")) == 9
    with pytest.raises(ValueError, match="age_target"):
        data.build_dataset("appa-real", tmp_path, age_target="biological")


# --------------------------------------------------------------------------- csv

def _csv_tree(root, rows, header="path,age,subject,age_std"):
    for row in rows:
        _image(root / "img" / row.split(",")[0].split("/")[-1])
    labels = root / "labels.csv"
    labels.write_text("\n".join([header] + [r.replace("IMG", "img") for r in rows]) + "\n")
    return labels


def test_csv_subject_split_relative_paths_and_split_column(tmp_path):
    rows = [f"img/{i}.jpg,{20 + i},p{i // 2},{'' if i % 3 else '2.5'}" for i in range(20)]
    labels = _csv_tree(tmp_path, rows)
    everything = data.build_dataset("csv", labels, split="all")
    assert everything.samples[3].path == str(tmp_path / "img" / "3.jpg")
    assert [s.age_std for s in everything.samples[:4]] == [2.5, None, None, 2.5]
    _check_subject_exclusive(_check_partition("csv", labels, 20))
    assert len(data.build_dataset("csv", tmp_path, split="all")) == 20  # a folder with one CSV
    with_split = _csv_tree(tmp_path / "s", ["img/a.jpg,30,x,,train", "img/b.jpg,40,y,,Valid",
                                             "img/c.jpg,50,z,,test"], header="path,age,subject,age_std,split")
    assert [s.age for s in data.build_dataset("csv", with_split, split="val").samples] == [40.0]


@pytest.mark.parametrize("row, message", [
    ("img/b.jpg,31", r"labels\.csv:3: 2 fields, the header has 3"),
    ("img/b.jpg,abc,x", r"labels\.csv:3: age 'abc' is not a number"),
    ("img/b.jpg,130,x", r"labels\.csv:3: age 130 lies outside 0\.\.120"),
    ("img/b.jpg,-1,x", r"labels\.csv:3: age -1 lies outside"),
    ("img/b.jpg,nan,x", r"labels\.csv:3: age 'nan' is not a number"),
    ("img/b.jpg,2_5,x", r"labels\.csv:3: age '2_5' is not a number"),  # float() reads 25
])
def test_csv_bad_rows_name_file_and_line(tmp_path, row, message):
    labels = _csv_tree(tmp_path, ["img/a.jpg,30,x", row], header="path,age,subject")
    with pytest.raises(data.DatasetError, match=message):
        data.build_dataset("csv", labels)


def test_csv_bad_header_missing_images_and_bad_split(tmp_path):
    labels = tmp_path / "x.csv"
    labels.write_text("file,age\na.jpg,3\n")
    with pytest.raises(data.DatasetError, match=r"x\.csv:1: .*lacks column\(s\) \['path'\]"):
        data.build_dataset("csv", labels)
    labels.write_text("path,age\nmissing.jpg,3\n")
    with pytest.raises(data.DatasetError, match=r"x\.csv:2: image .*missing\.jpg not found.*1 listed image\(s\) unusable"):
        data.build_dataset("csv", labels)
    _image(tmp_path / "a.jpg")
    labels.write_text("path,age,split\na.jpg,3,holdout\n")
    with pytest.raises(data.DatasetError, match=r"x\.csv:2: split 'holdout'"):
        data.build_dataset("csv", labels)


def test_appa_real_bad_row_names_file_and_line(tmp_path):
    _appa(tmp_path)
    with open(tmp_path / "gt_avg_valid.csv", "a") as handle:
        handle.write("000109.jpg,38,twenty,3.0,22\n")
    _image(tmp_path / "valid" / "000109.jpg")
    with pytest.raises(data.DatasetError, match=r"gt_avg_valid\.csv:5: apparent_age_avg 'twenty'"):
        data.build_dataset("appa-real", tmp_path, split="val")


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", [n for n in data.DATASETS if n != "synthetic"])
def test_missing_root_and_empty_dataset(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        data.build_dataset(name, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises((data.DatasetError, FileNotFoundError), match=str(empty)):
        data.build_dataset(name, empty)


def test_age_out_of_range_in_a_file_name_names_the_file(tmp_path):
    _image(tmp_path / "130_Old_Person_0001.jpg")
    with pytest.raises(data.DatasetError, match=r"130_Old_Person_0001\.jpg: age 130 lies outside"):
        data.build_dataset("cacd", tmp_path)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
        data.build_dataset("imdb", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.build_dataset("synthetic", split="dev")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['protocl'\]"):
        data.build_dataset("morph2", tmp_path, protocl="random")
    with pytest.raises(ValueError, match="fold must be 0"):
        data.build_dataset("utkface", tmp_path, fold=2)


def _bad_files(root):
    """One file of each broken kind, returned by name."""
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good.save(root / "full.jpg")
    payload = (root / "full.jpg").read_bytes()
    bad = {"truncated": payload[: len(payload) // 2], "empty": b"", "text": b"path,age\nnot an image\n",
           "corrupt": payload[:20] + bytes(200) + payload[220:]}
    paths = {}
    for kind, content in bad.items():
        paths[kind] = root / f"{kind}.jpg"
        paths[kind].write_bytes(content)
    return paths


def test_check_images_lists_every_broken_file(tmp_path):
    broken = _bad_files(tmp_path)
    samples = [data.Sample(str(tmp_path / "full.jpg"), 30.0)] + [data.Sample(str(p), 40.0) for p in broken.values()]
    report = dict(data.check_images(data.AgeDataset(samples)))
    assert set(report) == {str(p) for p in broken.values()}
    assert all(reason for reason in report.values())


def test_unreadable_images_are_skipped_counted_and_replaced(tmp_path):
    broken = _bad_files(tmp_path)
    good = [data.Sample(str(_image(tmp_path / f"ok{i}.jpg")), float(i)) for i in range(2)]
    samples = [good[0], data.Sample(str(broken["truncated"]), 50.0), data.Sample(str(broken["empty"]), 60.0), good[1]]
    dataset = data.AgeDataset(samples, transform=data.eval_transform(16))
    with pytest.warns(data.ImageSkipWarning, match="unreadable image") as caught:
        image, age = dataset[1]
    assert image.shape == (3, 16, 16) and age.item() == 1.0  # the next readable sample, deterministically
    messages = [str(w.message) for w in caught if w.category is data.ImageSkipWarning]
    assert len(messages) == 2 and "truncated.jpg" in messages[0] and "empty.jpg" in messages[1]
    assert dataset.skipped == [str(broken["truncated"]), str(broken["empty"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are not retried nor warned about again
        assert dataset[2][1].item() == 1.0
    assert len(list(dataset)) == 4  # iteration ends (IndexError past the end, no wrap-around)
    dead = data.AgeDataset([data.Sample(str(broken["text"]), 1.0)])
    with pytest.warns(data.ImageSkipWarning), pytest.raises(RuntimeError, match="check_images"):
        dead[0]


def test_skips_in_loader_workers_reach_the_main_process(tmp_path):
    broken = _bad_files(tmp_path)
    samples = [data.Sample(str(_image(tmp_path / f"ok{i}.jpg")), float(i)) for i in range(3)]
    samples.insert(1, data.Sample(str(broken["corrupt"]), 99.0))
    dataset = data.AgeDataset(samples, transform=data.eval_transform(16))
    ages = torch.cat([a for _, a in data.build_loader(dataset, 2, train=False, num_workers=1)])
    assert ages.tolist() == [0.0, 1.0, 1.0, 2.0]
    assert dataset.skipped == [str(broken["corrupt"])]


# --------------------------------------------------------------------------- images

def _halves(width=16, height=8):
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # display needs a 90 degree clockwise turn
    _halves().save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = np.asarray(data.load_image(tmp_path / "rotated.jpg"), dtype=int)
    assert image.shape == (16, 8, 3)  # width and height swapped
    assert image[:6, :, 0].min() > 200 and image[:6, :, 2].max() < 60  # left (red) went to the top
    assert image[10:, :, 2].min() > 200 and image[10:, :, 0].max() < 60


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                       ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "BMP"), ("RGB", "WEBP")])
def test_every_image_mode_loads_as_rgb(tmp_path, mode, fmt):
    if mode == "I;16":
        source = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))
        assert source.mode.startswith("I;16")
    else:
        source = _halves().convert(mode)
    path = tmp_path / f"image.{fmt.lower()}"
    source.save(path, format=fmt)
    image = data.load_image(path)
    assert image.mode == "RGB" and image.size == source.size
    assert np.asarray(image).std() > 10  # content survived, not a blank image
    assert data.eval_transform(8)(image).shape == (3, 8, 8)


def test_large_images_are_decoded_reduced(tmp_path, monkeypatch):
    _halves(640, 480).save(tmp_path / "big.jpg")
    _halves(640, 480).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stand-in for a photograph past PIL's bomb limit
    monkeypatch.setattr(data, "LARGE_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(data, "LARGE_IMAGE_SIDE", 100)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.jpg")
    for name in ("big.jpg", "big.png"):
        image = data.load_image(tmp_path / name)
        assert 100 <= min(image.size) < 240 and image.size[0] * 3 == image.size[1] * 4
        assert np.asarray(image)[:, 5, 0].min() > 200  # still red on the left
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's setting is restored


def test_transforms():
    image = _halves(40, 30)
    train = data.train_transform(24)(image)
    assert train.shape == (3, 24, 24) and train.dtype == torch.float32
    mean = torch.tensor(clip_loader.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(clip_loader.CLIP_STD).view(3, 1, 1)
    assert ((train * std + mean) >= -0.01).all() and ((train * std + mean) <= 1.01).all()  # CLIP normalised
    assert torch.equal(data.eval_transform(24)(image), clip_loader.image_transform(24)(image))
    torch.manual_seed(0)
    first = data.train_transform(24)(image)
    assert not torch.equal(first, data.train_transform(24)(image))  # random


# --------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_and_sized():
    train = data.build_dataset("synthetic", split="train", seed=3)
    assert len(train) == 2000 and len(data.build_dataset("synthetic", split="all")) == 2900
    again = data.build_dataset("synthetic", split="train", seed=3)
    assert [s.age for s in train.samples] == [s.age for s in again.samples]
    assert np.array_equal(np.asarray(train.image(7)), np.asarray(again.image(7)))
    other = data.build_dataset("synthetic", split="train", seed=4)
    assert not np.array_equal(np.asarray(train.image(7)), np.asarray(other.image(7)))
    test = data.build_dataset("synthetic", split="test", seed=3, n=50, image_size=32, min_age=10, max_age=20)
    assert len(test) == 50 and np.asarray(test.image(0)).shape == (32, 32, 3)
    assert {s.age for s in test.samples} <= set(range(10, 21)) and len({s.age for s in test.samples}) > 5
    ages = np.array([s.age for s in train.samples])
    assert ages.min() == 0 and ages.max() == 100 and abs(ages.mean() - 50) < 3  # uniform-ish
    image, age = data.build_dataset("synthetic", n={"val": 4}, split="val", transform=data.eval_transform(32))[1]
    assert image.shape == (3, 32, 32) and age.dtype == torch.float32
    assert data.check_images(train) == []


def test_synthetic_age_is_in_the_face_not_in_a_pixel():
    """Same nuisance draw, different ages: the images differ; across the data set no corner pixel
    predicts the age."""
    young = data.render_synthetic(10, np.random.default_rng(5), 64).astype(int)
    old = data.render_synthetic(80, np.random.default_rng(5), 64).astype(int)
    assert np.abs(young - old).mean() > 3
    dataset = data.build_dataset("synthetic", split="val")
    images = np.stack([np.asarray(dataset.image(i), dtype=float) for i in range(len(dataset))])
    ages = np.array([s.age for s in dataset.samples])
    for y, x in [(0, 0), (0, 63), (63, 0), (63, 63)]:
        assert abs(np.corrcoef(images[:, y, x].mean(1), ages)[0, 1]) < 0.2


# --------------------------------------------------------------------------- loader

@pytest.mark.parametrize("workers", [0, 1])
def test_loader_batches_shuffles_by_seed(workers):
    dataset = data.build_dataset("synthetic", split="test", n=10, image_size=16, transform=data.eval_transform(16))
    loader = data.build_loader(dataset, 4, train=True, num_workers=workers, seed=1)
    batches = list(loader)
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 16, 16)] * 2  # last partial batch dropped
    assert loader.persistent_workers == (workers > 0) and not loader.pin_memory
    order = torch.cat([b[1] for b in batches]).tolist()
    again = torch.cat([b[1] for b in data.build_loader(dataset, 4, train=True, num_workers=workers, seed=1)])
    assert order == again.tolist()
    ages = [s.age for s in dataset.samples]
    assert order != ages[:8]  # shuffled
    evaluation = torch.cat([b[1] for b in data.build_loader(dataset, 4, train=False, num_workers=workers)])
    assert evaluation.tolist() == ages  # every image once, in order


@pytest.mark.parametrize("workers", [0, 1])
def test_one_process_draws_the_batches_of_a_shuffling_dataloader(workers):
    """The training loader of one process draws exactly the batches torch's own shuffling draws (RandomSampler
    on the loader's seeded generator), as build_loader did before it had GlobalBatchSampler: a run is the
    same run. Partial last batch: kept only when the dataset holds less than one batch."""
    for n, batch in ((100, 8), (7, 8)):
        dataset = torch.utils.data.TensorDataset(torch.arange(n))
        shuffled = torch.utils.data.DataLoader(dataset, batch, shuffle=True, num_workers=workers,
                                               drop_last=n > batch, generator=torch.Generator().manual_seed(5))
        ours = data.build_loader(dataset, batch, train=True, num_workers=workers, seed=5)
        assert [b[0].tolist() for b in ours] == [b[0].tolist() for b in shuffled] and len(ours) == len(shuffled)


def test_processes_take_their_slice_of_every_global_batch():
    """Two processes with batch 3 see, batch by batch, the global batches of one process with batch 6."""
    one = list(data.GlobalBatchSampler(20, 6, torch.Generator().manual_seed(3)))
    two = [list(data.GlobalBatchSampler(20, 3, torch.Generator().manual_seed(3), rank, 2)) for rank in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 3   # the last 2 images: no full global batch
    assert [a + b for a, b in zip(*two)] == one
    assert sum(one, []) != list(range(18))   # shuffled, no image twice:
    assert len(set(sum(one, []))) == 18


def test_loader_takes_its_slice_under_torch_distributed(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                                         rank=0, world_size=1)
    try:
        dataset = data.build_dataset("synthetic", split="val", n=16, image_size=8)
        sampler = data.build_loader(dataset, 4, train=True, seed=2).batch_sampler
        assert isinstance(sampler, data.GlobalBatchSampler) and (sampler.rank, sampler.world) == (0, 1)
        assert data.build_loader(dataset, 4, train=False).batch_sampler.sampler.__class__.__name__ == "SequentialSampler"
    finally:
        torch.distributed.destroy_process_group()


def test_three_subjects_are_one_per_split():
    """The smallest dataset that splits: 80/10/10 of 3 subjects rounds val and test to 0, so each gets one
    subject (and training keeps one), whatever the seed; 2 subjects cannot fill three splits."""
    samples = [data.Sample(f"{i}.png", 20.0 + i, subject=f"s{i}") for i in range(3)]
    for seed in range(5):
        parts = [data.subject_split(samples, split, seed) for split in ("train", "val", "test")]
        assert [len(p) for p in parts] == [1, 1, 1]
        assert sorted(s.subject for p in parts for s in p) == ["s0", "s1", "s2"]
    two = [data.subject_split(samples[:2], split, 0) for split in ("train", "val", "test")]
    assert [len(p) for p in two] == [2, 0, 0]


def test_validation_is_halved_by_subject_into_val_and_calibration():
    """split_validation: the two parts are disjoint, subject-exclusive, cover the validation split, hold
    half of its subjects each (the calibration part the smaller half), and are fixed by the seed."""
    samples = [data.Sample(f"img/{i}.png", 20.0 + i, subject=f"s{i % 7}") for i in range(30)]
    for seed in (0, 1):
        val, calibration = (data.split_validation(samples, part, seed) for part in ("val", "calibration"))
        assert len(val) + len(calibration) == 30 and not {s.path for s in val} & {s.path for s in calibration}
        assert not _subjects_of(val) & _subjects_of(calibration)
        assert (len(_subjects_of(val)), len(_subjects_of(calibration))) == (4, 3)
        assert [s.path for s in data.split_validation(samples, "val", seed)] == [s.path for s in val]
    assert _subjects_of(data.split_validation(samples, "calibration", 0)) != \
        _subjects_of(data.split_validation(samples, "calibration", 1))
    # one subject: nothing to calibrate on; images without subjects are their own subjects
    assert data.split_validation(samples[:1], "calibration", 0) == []
    unknown = [data.Sample(f"img/{i}.png", 30.0) for i in range(10)]
    assert len(data.split_validation(unknown, "calibration", 0)) == 5
    with pytest.raises(ValueError, match="val or calibration"):
        data.split_validation(samples, "test", 0)


def _subjects_of(samples):
    return {s.subject for s in samples}
