"""Age-estimation data: the standard benchmarks with their published protocols, robust image
loading, CLIP-sized augmentation, and a built-in synthetic dataset for the demo.

Every dataset is read in the layout it ships in. A result is only comparable when its protocol is
named, and only honest when a person never appears on both sides of a split, so splits are
subject-exclusive wherever identities are known, seeded, and disjoint (see DATASETS).

Sections:
    images and transforms   load_image (any image file -> RGB, within size limits), check_image_size,
                            train_transform, eval_transform
    aligned faces           aligned_box, crop_aligned, aligned_crop_size, aligned_transform, Face, face_detector
    the dataset             AgeDataset, AlignedFaces (the benchmark's faces, cropped), collate_readable, check_images
    splits                  subject_key, random_split, subject_split, leave_one_subject_out, subject_kfold,
                            split_validation
    parsing the layouts     one reader per dataset (the unified benchmark's databases: BENCHMARK_SPLITS),
                            check_split_integrity, build_dataset
    dataset identity        index_entries, fingerprint, describe_change
    synthetic data          render_synthetic, draw_synthetic, SyntheticAgeDataset (the demo's data)
    captioned drawings      caption, CaptionedDrawings (the demo CLIP's pretraining corpus)
    loading                 GlobalBatchSampler, build_loader, set_epoch
    aligning a folder       align_folder, main (python data.py align --data-root RAW --out ALIGNED)
"""
import csv
import hashlib
import json
import math
import os
import random
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

import clip_loader

__all__ = ["Sample", "DatasetError", "ImageSkipWarning", "DATASETS", "PROTOCOLS", "SPLITS", "AGE_RANGE", "MORPH_FOLDS",
           "IMAGE_EXTENSIONS", "load_image", "check_image_size", "train_transform", "eval_transform",
           "synthetic_image_size",
           "ALIGN_MARGIN", "BENCHMARK_SPLITS", "aligned_box", "crop_aligned", "aligned_crop_size",
           "aligned_transform", "Face", "face_detector", "AgeDataset", "AlignedFaces", "collate_readable",
           "check_images", "random_split", "subject_split", "leave_one_subject_out",
           "subject_kfold", "split_validation", "subject_key", "check_split_integrity", "build_dataset",
           "index_entries", "fingerprint",
           "describe_change", "render_synthetic", "draw_synthetic", "SyntheticAgeDataset", "colour_name",
           "age_phrase", "caption", "CaptionedDrawings", "GlobalBatchSampler", "build_loader"]

# val and calibration are the two halves of the protocol's validation subjects (split_validation)
SPLITS = ("train", "val", "calibration", "test", "all")
FRACTIONS = (0.8, 0.1, 0.1)  # train/val/test share of subjects (or of images where no subjects are known)
VAL_FRACTION = 0.1  # of the non-test subjects, for the fold protocols (FG-NET LOPO, MORPH II 5-fold)
MORPH_FOLDS = 5
AGE_RANGE = (0.0, 120.0)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

# Large images: PIL refuses files above 2 * 89.5 M pixels as decompression bombs. Face crops never
# come close, but scans of photographs can; we accept up to MAX_IMAGE_PIXELS and decode anything above
# LARGE_IMAGE_PIXELS at reduced size (JPEG draft mode decodes at 1/2, 1/4, 1/8 scale without ever
# building the full image), keeping a short side of at least LARGE_IMAGE_SIDE, far above any CLIP input.
# A pixel count alone does not bound memory: a 1 x 20000 strip is small, but resizing its short side to
# the CLIP input makes it 224 x 4.5 M pixels; and RGBA costs 4 bytes a pixel. So the guard also bounds the
# aspect ratio (long side / short side) and the bytes PIL allocates to decode (after JPEG draft), which
# keeps one image under 1 GB whatever its shape or mode.
MAX_IMAGE_PIXELS = 2 ** 28  # 16384 x 16384, before JPEG draft
LARGE_IMAGE_PIXELS = 4096 * 4096
LARGE_IMAGE_SIDE = 1024
MAX_ASPECT_RATIO = 16  # faces are near 1; panoramas of 4 still pass
MAX_DECODED_BYTES = 2 ** 29  # 512 MiB: e.g. 11585^2 RGB (PIL stores RGB as 4 bytes), 23170^2 greyscale
COLOUR_JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2)  # no hue: skin colour carries age

DATASETS = {
    "utkface": "UTKFace, {age}_{gender}_{race}_{date}.jpg[.chip.jpg] in one or more folders; no identities, "
               "so a seeded random 80/10/10 image split (not subject-exclusive)",
    "fgnet": "FG-NET, {subject:3}A{age:2}[a-z].JPG (any case); leave-one-person-out: fold k tests the k-th "
             "subject in sorted order (82 folds), val = a seeded 10% of the other subjects",
    "morph2": "MORPH II, {subject}_{picture}{M|F}{age}.JPG; --protocol subject5fold (default): subjects in 5 "
              "seeded folds, fold k is test (20%), val = a seeded 10% of the other subjects (8%), train 72%; "
              "--protocol random: the common seeded 80/10/10 image split, NOT subject-exclusive",
    "cacd": "CACD2000, {age}_{Name}_{nnnn}.jpg; subject = the name; seeded subject-exclusive 80/10/10 "
            "split of the celebrities (not the official rank-based one)",
    "agedb": "AgeDB, {index}_{Name}_{age}_{m|f}.jpg; subject = the name; seeded subject-exclusive "
             "80/10/10 split of the people",
    "appa-real": "APPA-REAL, gt_avg_{train,valid,test}.csv beside train/ valid/ test/ ({file}_face.jpg "
                 "preferred); the official splits; apparent age (with its std) by default, "
                 "--age-target real for the real age",
    "facebase": "the unified age-estimation benchmark's databases (JSON, --database) over an image root; the "
                "benchmark's five subject-exclusive splits by folder (--split-index 0..4; three-folder databases: "
                "0; FG-NET: the held-out folder 1..82), faces cropped with their aligned box (--crop-margin)",
    "csv": "any CSV with header path,age[,subject][,age_std][,split], paths relative to the CSV; its split "
           "column if given, else a seeded 80/10/10 split, subject-exclusive when subject is given",
    "synthetic": "generated face-like drawings (NOT faces): age shown by proportions, wrinkles, grey hair, "
                 "hairline, skin texture and spots; deterministic from the seed, no files; "
                 "train/val/test 2000/300/300",
}
# The split protocol each dataset follows unless a protocol option says otherwise (printed by eval.py).
PROTOCOLS = {"utkface": "random80/10/10", "fgnet": "leave-one-person-out", "morph2": "subject5fold",
             "cacd": "subject80/10/10", "agedb": "subject80/10/10", "appa-real": "official",
             "facebase": "benchmark-split", "csv": "split-column-or-subject80/10/10", "synthetic": "generated"}
# Options each dataset accepts beyond the common arguments, so a typo is an error, not a silent default.
OPTIONS = {"morph2": {"protocol"}, "appa-real": {"age_target"}, "facebase": {"database", "margin", "crop_size"},
           "synthetic": {"n", "image_size", "min_age", "max_age"}}


class DatasetError(ValueError):
    """A label file or file name that cannot be used; the message names the file (and line)."""


class ImageSkipWarning(UserWarning):
    """An image that did not decode was replaced by another sample (see AgeDataset.skipped)."""


@dataclass
class Sample:
    path: str
    age: float
    subject: Optional[str] = None  # identity, for subject-exclusive splits; None where unknown
    age_std: Optional[float] = None  # spread of the apparent-age votes (APPA-REAL): the epsilon-error, the
                                     # label distribution's sigma (train.py --label-sigma)
    source: Optional[str] = None  # "file:line" of the label row it came from, for error messages
    box: Optional[tuple] = None  # the oriented face box to crop (crop_aligned), for the benchmark's databases


# --------------------------------------------------------------------------- images and transforms

def _pil_bytes_per_pixel(mode: str) -> int:
    """Bytes PIL allocates per pixel: 1 for 1/L/P, 2 for I;16*, 4 for every other mode (RGB included)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def _check_regular_file(path):
    """Raise on a FIFO, device or folder: opening a FIFO blocks forever, a device may never end."""
    if not os.path.isfile(path):  # follows symlinks; False for FIFOs, sockets, devices and folders
        kind = "does not exist" if not os.path.lexists(path) else "is not a regular file (a FIFO, device or folder)"
        raise OSError(f"{path} {kind}")


def load_image(path) -> Image.Image:
    """Decode any image file to an RGB PIL image: every PIL mode (via clip_loader.to_rgb), EXIF
    orientation applied, very large images decoded at reduced size. Raises on a file that does not decode
    (PIL's own errors: empty, truncated, corrupt, not an image), on a non-regular file (OSError), and on
    an image beyond the size guard above (ValueError, naming the limit)."""
    _check_regular_file(path)
    # PIL's limit is a module global: raise it only around open() (DataLoader workers are processes,
    # so no other thread sees the change); PIL errors at twice the limit
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2
    try:
        image = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    try:
        large = image.size[0] * image.size[1] > LARGE_IMAGE_PIXELS
        if large and image.format == "JPEG":  # draft keeps both sides >= the request: ask for the short-side target
            scale = LARGE_IMAGE_SIDE / min(image.size)
            image.draft("RGB", tuple(math.ceil(side * scale) for side in image.size))
        check_image_size(image)  # after draft: the size and mode that will really be decoded
        image.load()  # decode now, so a truncated file fails here and not inside a transform
    except Exception:
        image.close()  # PIL leaves the file open when decoding fails
        raise
    ImageOps.exif_transpose(image, in_place=True)  # before reduce(), which drops the EXIF data
    factor = min(image.size) // LARGE_IMAGE_SIDE
    if large and factor > 1:
        image = image.reduce(factor)
    return clip_loader.to_rgb(image)


def check_image_size(image: Image.Image):
    """The size guard above (ValueError naming the limit): the aspect ratio, the pixels, and the bytes PIL
    holds (or will hold, before decoding) for the image."""
    width, height = image.size
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"{width}x{height} pixels: aspect ratio beyond {MAX_ASPECT_RATIO}:1, not a face image")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}x{height} pixels: more than the {MAX_IMAGE_PIXELS:,} of an image accepted")
    decoded = width * height * _pil_bytes_per_pixel(image.mode)
    if decoded > MAX_DECODED_BYTES:
        raise ValueError(f"{width}x{height} {image.mode} pixels would decode to {decoded / 2 ** 20:.0f} MiB, above "
                         f"the {MAX_DECODED_BYTES / 2 ** 20:.0f} MiB limit; downscale the file")


def train_transform(resolution: int, mean=clip_loader.CLIP_MEAN, std=clip_loader.CLIP_STD) -> Callable:
    """The authors' augmentation scaled to the backbone: random resized crop to the input size (area
    scale 0.5-1, aspect 3/4-4/3), horizontal flip, small colour jitter, the CLIP's normalisation
    (mean/std: OpenAI's, or what the CLIP's config states, model.clip.image_mean/image_std).

    Their pipeline resized the short side to 256 before a 224 crop; a crop's area fraction and aspect do
    not change under that uniform resize, so cropping the original draws the same crops with one
    resampling instead of two (sharper and faster)."""
    return T.Compose([
        clip_loader.to_rgb,
        T.RandomResizedCrop(resolution, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ColorJitter(**COLOUR_JITTER),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def synthetic_image_size(resolution: int) -> int:
    """The side of the synthetic drawings for a model input of `resolution`: 256/224 of it, the size
    train_transform's crops come from in the authors' pipeline, so no detail is lost."""
    return round(resolution * 256 / 224)


def eval_transform(resolution: int, mean=clip_loader.CLIP_MEAN, std=clip_loader.CLIP_STD) -> Callable:
    """OpenAI's evaluation transform (resize, centre crop, normalise with the CLIP's mean/std)."""
    return clip_loader.image_transform(resolution, mean, std)


# --------------------------------------------------------------------------- aligned faces
# The unified age-estimation benchmark (Paplham and Franc, CVPR 2024) frames every face one way: an
# oriented box computed from the eyes and the mouth, warped to a square with a small margin, so that a
# face fills the same part of the input whatever the photograph. Training, evaluation and prediction all
# crop with these two functions; augmentation then works on the crop, never on the raw photograph.

ALIGN_MARGIN = 0.05  # the benchmark's: its 256 x 256 inputs are taken from 281 x 281 crops
# MTCNN's face probability between the true faces of the bundled photos and their one false positive, a
# part of the motorcycle (bench/README.md#prediction-on-photos).
FACE_MIN_PROBABILITY = 0.95
FACES_INSTALL = 'pip install "facenet-pytorch>=2.5,<2.6"  (or, in this repository, pip install -e ".[faces]")'


def aligned_box(eye_left, eye_right, mouth) -> list:
    """The benchmark's oriented face box from three (column, row) points in pixel coordinates (0-based, as
    detectors report them): the centres of the two eyes, in either order, and of the mouth. Returns
    [Ax, Ay, Bx, By, Cx, Cy, Dx, Dy]: the corners A (top left as the face is upright), B, C, D in turn,
    1-based and truncated toward zero, as the benchmark's databases store them.

    The box is a square centred on the eyes' midpoint moved a tenth of the way toward the mouth; half its
    side is the larger of 2.0 x the eye distance and 1.8 x the distance from the eyes' midpoint to the
    mouth; its horizontal axis is the sum of the eye-to-eye vector and the eyes-to-mouth vector turned a
    quarter turn, so the box turns with the face. The eye vector is taken to point to the face's left
    (the image's right for an upright face); eyes given in the other order are swapped."""
    left, right, mouth = (np.asarray(p, dtype=np.float64) for p in (eye_left, eye_right, mouth))
    middle = (left + right) / 2
    eyes, down = left - right, mouth - middle
    across = np.array([down[1], -down[0]])  # eyes-to-mouth turned a quarter: left to right of the face
    if eyes @ across < 0:  # the eyes came in the other order
        eyes = -eyes
    axis = eyes + across
    if not np.hypot(*axis) > 0:
        raise ValueError(f"aligned_box: the eyes {eye_left}, {eye_right} and the mouth {mouth} coincide")
    half = max(2.0 * np.hypot(*eyes), 1.8 * np.hypot(*down))
    x = axis / np.hypot(*axis) * half  # half the side, along the face's horizontal
    y = np.array([-x[1], x[0]])  # and along its vertical (rows grow downward)
    centre = middle + 0.1 * down
    corners = np.stack([centre - x - y, centre + x - y, centre + x + y, centre - x + y]) + 1  # 1-based
    return [int(v) for v in corners.flatten()]  # int(): toward zero, as the benchmark rounds


def crop_aligned(image: Image.Image, box, size: int, margin: float = ALIGN_MARGIN) -> Image.Image:
    """The size x size crop of a PIL image for an oriented box (8 numbers, corners A, B, C, D, 1-based, as
    aligned_box and the benchmark's databases give them): the affine map that sends A, B and C, each
    pushed outward by `margin` (a fraction of the box's width along A-B and of its height along A-D), to
    the output's pixels (0, 0), (size-1, 0) and (size-1, size-1); bilinear, black beyond the image."""
    if size < 2:
        raise ValueError(f"crop_aligned: size must be at least 2, not {size}")
    a, b, c, d = np.asarray(box, dtype=np.float64).reshape(4, 2) - 1  # 0-based pixel coordinates
    a, b, c = (a + (a - b) * margin + (a - d) * margin, b + (b - a) * margin + (b - c) * margin,
               c + (c - d) * margin + (c - b) * margin)
    column, row = (b - a) / (size - 1), (c - b) / (size - 1)  # input step per output column, per output row
    # PIL maps output pixel centres (x + 0.5, y + 0.5) to input coordinates whose pixel centres are at + 0.5
    origin = a + 0.5 - 0.5 * (column + row)
    return image.transform((size, size), Image.Transform.AFFINE,
                           (column[0], row[0], origin[0], column[1], row[1], origin[1]),
                           resample=Image.Resampling.BILINEAR)


def aligned_crop_size(resolution: int, margin: float = ALIGN_MARGIN) -> int:
    """The side of the aligned crop for a model input of `resolution`: enlarged by the margin on each side
    and truncated, as the benchmark's 281 for 256; training takes random `resolution` crops of it,
    evaluation its centre."""
    return int(resolution * (1 + 2 * margin))


def aligned_transform(resolution: int, train: bool, mean=clip_loader.CLIP_MEAN, std=clip_loader.CLIP_STD) -> Callable:
    """The transform of an aligned crop (aligned_crop_size): for training a random `resolution` crop, a
    horizontal flip and train_transform's colour jitter, as the benchmark's own pipeline jitters and flips
    its crops; otherwise the centre crop; then the CLIP's normalisation. Neither resizes: the face keeps
    the scale the crop gave it."""
    crop = [T.RandomCrop(resolution), T.RandomHorizontalFlip(), T.ColorJitter(**COLOUR_JITTER)] if train \
        else [T.CenterCrop(resolution)]
    return T.Compose([clip_loader.to_rgb, *crop, T.ToTensor(), T.Normalize(mean, std)])


@dataclass
class Face:
    """One face MTCNN found: its box (x0, y0, x1, y1) and five landmarks ((column, row) of the eyes, the
    nose and the mouth's corners, as MTCNN orders them), in pixels of the photo."""
    box: tuple
    landmarks: tuple
    probability: float

    def aligned_box(self) -> list:
        """aligned_box from the eyes and the midpoint of the mouth's corners."""
        eye_1, eye_2, _, mouth_1, mouth_2 = self.landmarks
        return aligned_box(eye_1, eye_2, ((mouth_1[0] + mouth_2[0]) / 2, (mouth_1[1] + mouth_2[1]) / 2))


def face_detector(device="cpu", min_probability: float = FACE_MIN_PROBABILITY) -> Callable:
    """A function PIL image -> [Face, ...] (left to right) with MTCNN (facenet-pytorch, the [faces] extra,
    imported only here), keeping faces of probability >= min_probability; a missing facenet-pytorch is a
    one-line SystemExit naming the install command."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise SystemExit(f"finding faces needs facenet-pytorch: {FACES_INSTALL}") from None
    mtcnn = MTCNN(keep_all=True, device=device)

    def detect(image: Image.Image) -> list:
        if min(image.size) < mtcnn.min_face_size:  # 2.5.x crashes on images smaller than its smallest face
            return []
        boxes, probabilities, landmarks = mtcnn.detect(image, landmarks=True)
        if boxes is None:
            return []
        faces = [Face(tuple(float(v) for v in box), tuple(tuple(float(v) for v in point) for point in points),
                      float(p)) for box, p, points in zip(boxes, probabilities, landmarks) if p >= min_probability]
        return sorted(faces, key=lambda face: face.box)
    return detect


# --------------------------------------------------------------------------- the dataset

class AgeDataset(Dataset):
    """(image, age) pairs from a list of Samples. Without a transform the image is the RGB PIL image.

    A file that does not decode never stops an epoch: it is recorded (shared across DataLoader workers),
    a warning names it once, and then either
      - for training (the default): the next readable sample in order is returned in its place, so the
        substitution is deterministic and every batch stays full;
      - with drop_unreadable=True (every evaluation: train.py's and eval.py's): None is returned, which
        collate_readable leaves out, so a metric covers the readable images exactly once.
    `skipped` lists the files met so far; check_images() finds them all up front.
    with_age_std (False by default): each item is (image, age, age_std), age_std the sample's apparent-age
    spread as a float32 tensor, nan where it has none (the training split of train.py --label-sigma age-std)."""

    def __init__(self, samples: list, transform: Optional[Callable] = None, ignored: Optional[list] = None,
                 drop_unreadable: bool = False):
        self.samples = samples
        self.transform = transform
        self.ignored = ignored or []  # files under the root whose names carry no usable label
        self.drop_unreadable = drop_unreadable
        self.with_age_std = False
        self.root = None  # the dataset's folder (build_dataset sets it), for fingerprint paths
        # one flag per sample in shared memory, so workers' findings reach the main process
        self._bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        return load_image(self.samples[index].path)

    @property
    def skipped(self) -> list:
        return [self.samples[i].path for i in torch.nonzero(self._bad).flatten().tolist()]

    def __getitem__(self, index: int):
        n = len(self.samples)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")  # also ends `for x in dataset`
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                if self.drop_unreadable:
                    return None
                continue
            try:
                image = self.image(i)
            except Exception as error:  # PIL raises many types on corrupt data (OSError, SyntaxError, ...)
                self._bad[i] = True
                warnings.warn(f"skipping unreadable image {self.samples[i].path} ({error}); "
                              f"{int(self._bad.sum())} skipped so far", ImageSkipWarning)
                if self.drop_unreadable:
                    return None
                continue
            if self.transform is not None:
                image = self.transform(image)
            age = torch.tensor(self.samples[i].age, dtype=torch.float32)
            if not self.with_age_std:
                return image, age
            std = self.samples[i].age_std
            return image, age, torch.tensor(float("nan") if std is None else std, dtype=torch.float32)
        raise RuntimeError(f"none of the {n} images of this dataset could be read; run check_images()")


class AlignedFaces(AgeDataset):
    """The benchmark's entries: each image is its face, crop_aligned from the sample's box at crop_size
    with the margin, warped from the photograph every time it is read (a cache of the crops would save
    little: bench/README.md#aligned-crops). left_out: reason -> [img_path] of the entries left out."""

    def __init__(self, samples: list, transform: Optional[Callable], margin: float, crop_size: int,
                 left_out: Optional[dict] = None, drop_unreadable: bool = False):
        super().__init__(samples, transform, drop_unreadable=drop_unreadable)
        self.margin, self.crop_size, self.left_out = margin, crop_size, left_out or {}

    def image(self, index: int) -> Image.Image:
        sample = self.samples[index]
        photo = load_image(sample.path)
        with Image.open(sample.path) as header:  # the box is in the stored file's pixels; a large one is
            scale = max(photo.size) / max(header.size)  # decoded at reduced size (load_image)
        box = sample.box if scale == 1 else (np.asarray(sample.box) - 0.5) * scale + 0.5  # pixel centres scale
        return crop_aligned(photo, box, self.crop_size, self.margin)


def collate_readable(batch: list):
    """DataLoader collate_fn for drop_unreadable datasets: the batch without its None items (None when
    nothing is left)."""
    batch = [item for item in batch if item is not None]
    return torch.utils.data.default_collate(batch) if batch else None


def check_images(dataset: AgeDataset, progress: bool = False) -> list:
    """Read every image file of the dataset with load_image, in sample order, and return [(path, "Type:
    message")] for each one it refuses: empty, truncated, corrupt, not an image, not a regular file, or
    beyond the size guard. Only reports: dataset.skipped is left as it is. progress=True shows a tqdm bar.
    A SyntheticAgeDataset has no files: []."""
    if isinstance(dataset, SyntheticAgeDataset):
        return []
    samples = dataset.samples
    if progress:
        from tqdm import tqdm
        samples = tqdm(samples, desc="checking images", unit="img")
    bad = []
    for sample in samples:
        try:
            load_image(sample.path)
        except Exception as error:
            bad.append((sample.path, f"{type(error).__name__}: {error}"))
    return bad


# --------------------------------------------------------------------------- splits

def _split_counts(n: int, fractions=FRACTIONS) -> tuple:
    """(train, val, test) counts summing to n; val and test get at least one item when n >= 3."""
    n_val, n_test = (round(n * f) for f in fractions[1:])
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    return n - n_val - n_test, n_val, n_test


def subject_key(sample: Sample) -> str:
    """Who a sample shows, for subject-exclusive splits: its subject, or (unknown) the image itself."""
    return sample.subject if sample.subject is not None else "path:" + sample.path


def _assign(keys: list, seed) -> dict:
    """Seeded train/val/test assignment of the sorted unique keys (subjects, or paths)."""
    unique = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_train, n_val, _ = _split_counts(len(unique))
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(unique) - n_train - n_val)
    return {unique[j]: names[rank] for rank, j in enumerate(order)}


def _select(samples: list, split: str, key: Callable, seed) -> list:
    if split == "all":
        return samples
    assignment = _assign([key(s) for s in samples], seed)
    return [s for s in samples if assignment[key(s)] == split]


def random_split(samples: list, split: str, seed: int) -> list:
    """Seeded 80/10/10 split of the images; NOT subject-exclusive."""
    return _select(samples, split, lambda s: s.path, seed)


def subject_split(samples: list, split: str, seed: int) -> list:
    """Seeded 80/10/10 split of the subjects (a sample without subject is its own subject)."""
    return _select(samples, split, subject_key, seed)


def _fold_split(samples: list, split: str, test_subjects: set, fold: int, seed: int) -> list:
    """Test = test_subjects; val = a seeded VAL_FRACTION of the other subjects; train = the rest."""
    if split == "all":
        return samples
    if split == "test":
        return [s for s in samples if s.subject in test_subjects]
    others = sorted({s.subject for s in samples} - test_subjects)
    order = np.random.default_rng([seed, fold]).permutation(len(others))
    n_val = max(1, round(len(others) * VAL_FRACTION)) if len(others) > 1 else 0
    val = {others[j] for j in order[:n_val]}
    chosen = val if split == "val" else set(others) - val
    return [s for s in samples if s.subject in chosen]


def leave_one_subject_out(samples: list, split: str, fold: int, seed: int) -> list:
    """Fold k tests the k-th subject in sorted order."""
    subjects = sorted({s.subject for s in samples})
    if not 0 <= fold < len(subjects):
        raise ValueError(f"fold {fold} out of range: leave-one-person-out has {len(subjects)} folds "
                         f"(0..{len(subjects) - 1})")
    return _fold_split(samples, split, {subjects[fold]}, fold, seed)


def subject_kfold(samples: list, split: str, fold: int, seed: int, k: int = MORPH_FOLDS) -> list:
    """Subjects dealt into k seeded folds; fold `fold` is test."""
    if not 0 <= fold < k:
        raise ValueError(f"fold {fold} out of range: this protocol has {k} folds (0..{k - 1})")
    subjects = sorted({s.subject for s in samples})
    order = np.random.default_rng(seed).permutation(len(subjects))
    test = {subjects[j] for rank, j in enumerate(order) if rank % k == fold}
    return _fold_split(samples, split, test, fold, seed)


def split_validation(samples: list, part: str, seed: int) -> list:
    """One half of a protocol's validation split, seeded and subject-exclusive (a sample without subject
    is its own subject): part "val", the images train.py selects its checkpoint on, or "calibration", the
    images its uncertainty and conformal intervals are calibrated on. A calibration on the very images
    the checkpoint was chosen on would be optimistic (README.md#age-intervals). With
    one validation subject the calibration part is empty."""
    if part not in ("val", "calibration"):
        raise ValueError(f"part must be val or calibration, got {part!r}")
    keys = sorted({subject_key(s) for s in samples})
    order = np.random.default_rng([seed, len(keys), 2]).permutation(len(keys))
    calibration = {keys[j] for rank, j in enumerate(order) if rank < len(keys) // 2}
    return [s for s in samples if (subject_key(s) in calibration) == (part == "calibration")]


# --------------------------------------------------------------------------- parsing the layouts

def _check_root(name: str, root: Path):
    if not root.exists():
        raise FileNotFoundError(f"{name}: data root {root} does not exist")


def _image_files(root: Path) -> list:
    # "._x.jpg": the metadata files macOS writes beside every file on foreign disks; never images
    files = [Path(d) / f for d, _, names in os.walk(root) for f in names
             if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("._")]
    return sorted(files, key=str)  # os.walk order depends on the file system


# A plain decimal number: float() alone also reads "2_5" as 25, and "inf" and "nan"
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _age(text: str, where, field: str = "age") -> float:
    """The number in text, checked to lie in AGE_RANGE; field names the column in the error."""
    if not _NUMBER.fullmatch(text.strip()):
        raise DatasetError(f"{where}: {field} {text!r} is not a number")
    age = float(text)
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise DatasetError(f"{where}: {field} {text} lies outside {AGE_RANGE[0]:g}..{AGE_RANGE[1]:g}")
    return age


def _name(text: str) -> str:
    # one person written in NFC and NFD must stay one subject
    return unicodedata.normalize("NFC", text.strip())


def _parse_names(name: str, root: Path, pattern: re.Pattern, make: Callable, example: str):
    """Samples from the files under root whose names match pattern; make(match, path) -> Sample.
    Files that do not match are skipped, counted and named in a warning."""
    _check_root(name, root)
    samples, ignored = [], []
    for path in _image_files(root):
        match = pattern.match(path.name)
        if match:
            samples.append(make(match, path))
        else:
            ignored.append(str(path))
    if ignored:
        shown = ", ".join(Path(p).name for p in ignored[:3])
        warnings.warn(f"{name}: skipped {len(ignored)} file(s) under {root} whose names do not read as "
                      f"{example} (e.g. {shown})")
    if not samples:
        raise DatasetError(f"{name}: no images named like {example} under {root}")
    return samples, ignored


_UTK = re.compile(r"^(\d{1,3})_")
_FGNET = re.compile(r"^(\d{3})a(\d{1,2})[a-z]?\.(jpe?g|png|bmp)$", re.IGNORECASE)
_MORPH = re.compile(r"^(\d+)_(\d{1,2})([MF])(\d{1,3})\.(jpe?g|png)$", re.IGNORECASE)
_CACD = re.compile(r"^(\d{1,3})_(.+)_(\d{4})\.jpe?g$", re.IGNORECASE)
_AGEDB = re.compile(r"^(\d+)_(.+)_(\d{1,3})_([mf])\.jpe?g$", re.IGNORECASE)


def _utkface(root: Path, seed: int):
    _check_root("utkface", root)
    # The release's malformed names (a field missing, '__', ' .jpg', 'jpg.chip') still start with the age,
    # the only label used, so the first field alone decides. The aligned crops (.chip.jpg) and the
    # in-the-wild originals share a base name: keep one of each, the aligned one, so no photo can land in
    # two splits when both folders sit under root.
    by_base, ignored = {}, []
    for path in _image_files(root):
        match = _UTK.match(path.name)
        if not match or not AGE_RANGE[0] <= int(match.group(1)) <= AGE_RANGE[1]:
            ignored.append(str(path))
            continue
        base = path.name.lower().replace(".chip.jpg", "")
        if base not in by_base or ".chip." in path.name.lower():
            by_base[base] = Sample(str(path), float(match.group(1)))
    if ignored:
        warnings.warn(f"utkface: skipped {len(ignored)} file(s) whose first field is not an age in 0..120 "
                      f"(e.g. {', '.join(Path(p).name for p in ignored[:3])})")
    if not by_base:
        raise DatasetError(f"utkface: no images named like 25_0_1_20170116174525125.jpg.chip.jpg under {root}")
    samples = sorted(by_base.values(), key=lambda s: s.path)
    return samples, ignored, lambda split: random_split(samples, split, seed), False


def _fgnet(root: Path, fold: int, seed: int):
    samples, ignored = _parse_names(
        "fgnet", root, _FGNET,
        lambda m, p: Sample(str(p), _age(m.group(2), p), subject=m.group(1)), "001A02.JPG")
    leave_one_subject_out(samples, "test", fold, seed)  # a bad fold fails here, for every split
    return samples, ignored, lambda split: leave_one_subject_out(samples, split, fold, seed), True


def _morph2(root: Path, fold: int, seed: int, protocol: str = "subject5fold"):
    samples, ignored = _parse_names(
        "morph2", root, _MORPH,
        lambda m, p: Sample(str(p), _age(m.group(4), p), subject=m.group(1)), "012345_1M25.JPG")
    if protocol == "random":
        _single_split("morph2 --protocol random", fold)
        return samples, ignored, lambda split: random_split(samples, split, seed), False  # NOT exclusive
    if protocol == "subject5fold":
        subject_kfold(samples, "test", fold, seed)  # a bad fold fails here, for every split
        return samples, ignored, lambda split: subject_kfold(samples, split, fold, seed), True
    raise ValueError(f"morph2: unknown protocol {protocol!r}; use 'subject5fold' or 'random'")


def _cacd(root: Path, seed: int):
    samples, ignored = _parse_names(
        "cacd", root, _CACD,
        lambda m, p: Sample(str(p), _age(m.group(1), p), subject=_name(m.group(2))), "53_Robert_De_Niro_0001.jpg")
    return samples, ignored, lambda split: subject_split(samples, split, seed), True


def _agedb(root: Path, seed: int):
    samples, ignored = _parse_names(
        "agedb", root, _AGEDB,
        lambda m, p: Sample(str(p), _age(m.group(3), p), subject=_name(m.group(2))), "0_MariaCallas_35_f.jpg")
    return samples, ignored, lambda split: subject_split(samples, split, seed), True


def _read_csv(path: Path, required: tuple):
    """(header, [(line number, {column: value})]) of a CSV; every row must have the header's length."""
    try:
        _check_regular_file(path)  # a FIFO would block open() forever
    except OSError as error:
        raise DatasetError(str(error)) from None
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate a BOM from spreadsheets
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DatasetError(f"{path}:1: header {header} lacks column(s) {missing}")
            rows = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DatasetError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}")
                rows.append((reader.line_num, dict(zip(header, (cell.strip() for cell in row)))))
    except UnicodeDecodeError:  # e.g. Latin-1 from an old spreadsheet
        raise DatasetError(f"{path}: not UTF-8 text ({_first_non_utf8(path)}); save it as UTF-8") from None
    return header, rows


def _first_non_utf8(path: Path) -> str:
    """Where a file stops being UTF-8, as "byte 0xNN on line L" (the decoder's own error only knows the
    position inside the chunk it was reading)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"byte 0x{line[error.start]:02x} on line {number}"
    return "an incomplete character at the end"


_APPA_FOLDERS = {"train": "train", "val": "valid", "test": "test"}


def _appa_real(root: Path, age_target: str = "apparent"):
    _check_root("appa-real", root)
    if age_target not in ("apparent", "real"):
        raise ValueError(f"appa-real: age_target must be 'apparent' or 'real', not {age_target!r}")
    samples, split_of = [], []
    for split, folder in _APPA_FOLDERS.items():
        labels = root / f"gt_avg_{folder}.csv"
        if not labels.is_file():
            raise FileNotFoundError(f"appa-real: {labels} not found (the release's gt_avg_{folder}.csv)")
        _, rows = _read_csv(labels, ("file_name", "apparent_age_avg", "apparent_age_std", "real_age"))
        for line, row in rows:
            where = f"{labels}:{line}"
            face = root / folder / (row["file_name"] + "_face.jpg")  # the release's aligned crop
            path = face if face.is_file() else root / folder / row["file_name"]
            if not path.is_file():
                raise DatasetError(f"{where}: image {path} not found")
            if age_target == "real":
                samples.append(Sample(str(path), _age(row["real_age"], where, "real_age"), source=where))
            else:
                samples.append(Sample(str(path), _age(row["apparent_age_avg"], where, "apparent_age_avg"),
                                      age_std=_age(row["apparent_age_std"], where, "apparent_age_std"),
                                      source=where))
            split_of.append(split)
    if not samples:
        raise DatasetError(f"appa-real: the label files under {root} list no images")
    return samples, [], lambda split: [s for s, name in zip(samples, split_of) if split in ("all", name)], True


_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _csv(root: Path, seed: int):
    _check_root("csv", root)
    if root.is_dir():
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise DatasetError(f"csv: {root} holds {len(found)} .csv files; pass the CSV file itself")
        root = found[0]
    header, rows = _read_csv(root, ("path", "age"))
    samples, splits = [], []
    for line, row in rows:
        where = f"{root}:{line}"
        std = row.get("age_std") or None
        # canonical: absolute and normalised, so img/../img/x.jpg and img/x.jpg are one image
        samples.append(Sample(os.path.abspath(root.parent / row["path"]), _age(row["age"], where),
                              subject=(_name(row["subject"]) or None) if "subject" in row else None,
                              age_std=None if std is None else _age(std, where, "age_std"), source=where))
        if "split" in header:
            if row["split"].lower() not in _SPLIT_NAMES:
                raise DatasetError(f"{where}: split {row['split']!r} is not one of train, val, test")
            splits.append(_SPLIT_NAMES[row["split"].lower()])
    if not samples:
        raise DatasetError(f"csv: {root} lists no images")
    missing = [s for s in samples if not os.path.isfile(s.path)]
    if missing:
        kind = "not found" if not os.path.lexists(missing[0].path) else "not a regular file"
        raise DatasetError(f"{missing[0].source}: image {missing[0].path} {kind} (paths are relative to the CSV); "
                           f"{len(missing)} listed image(s) unusable")
    if splits:
        return samples, [], lambda split: [s for s, name in zip(samples, splits) if split in ("all", name)], True
    # with no subject column each image is its own subject
    return samples, [], lambda split: subject_split(samples, split, seed), True


# The unified benchmark's databases (github.com/paplhjak/Facial-Age-Estimation-Benchmark-Databases): a
# JSON list of entries {"img_path", "id_num", "age", "folder", "aligned_bbox", ...}, img_path relative to
# the image root, age -1 when unknown, every image of a subject in one folder. The five splits as the
# benchmark publishes them, (train, val, test) folders; as published, folders 3 and 4 are tested in two
# splits and folders 6 and 7 in none. Databases with three folders (CACD2000, CLAP2016) have one split.
BENCHMARK_SPLITS = (((0, 1, 2, 3, 4, 5), (6, 7), (8, 9)), ((2, 3, 4, 5, 6, 7), (8, 9), (0, 1)),
                    ((4, 5, 6, 7, 8, 9), (0, 1), (2, 3)), ((5, 6, 7, 8, 9, 0), (1, 2), (3, 4)),
                    ((6, 7, 8, 9, 0, 1), (2, 3), (4, 5)))
SINGLE_SPLIT = ((0,), (1,), (2,))
LEFT_OUT = ("unknown age (-1)", "no aligned_bbox", "image not found")  # why an entry is left out


def _database_entries(path: Path) -> list:
    """The list a database JSON file holds; a DatasetError naming the file (and line) otherwise."""
    try:
        _check_regular_file(path)
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except OSError as error:
        raise DatasetError(f"facebase: database {error}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text ({_first_non_utf8(path)})") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: not JSON ({error.msg})") from None
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: a database is a JSON list of entries, not a {type(entries).__name__}")
    return entries


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _database(path: Path, root: Path):
    """(samples, folders, left_out) of one database: a Sample per usable entry (its box kept), the entry's
    folder beside it, and reason -> [img_path] of the entries left out (LEFT_OUT). Every other defect is a
    DatasetError naming the entry's index and img_path."""
    samples, folders, left_out, first_folder = [], [], {reason: [] for reason in LEFT_OUT}, {}
    for index, entry in enumerate(_database_entries(path)):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("img_path"), str) or not entry["img_path"]:
            raise DatasetError(f"{where}: not an object with an img_path")
        where += f" ({entry['img_path']})"
        for key in ("age", "id_num", "folder"):
            if key not in entry:
                raise DatasetError(f"{where}: no {key}")
        age, folder, box = entry["age"], entry["folder"], entry.get("aligned_bbox")
        if not _is_number(age) or not (age == -1 or AGE_RANGE[0] <= age <= AGE_RANGE[1]):
            raise DatasetError(f"{where}: age {age!r} is neither -1 (unknown) nor in {AGE_RANGE[0]:g}..{AGE_RANGE[1]:g}")
        if not isinstance(folder, int) or isinstance(folder, bool) or folder < 0:
            raise DatasetError(f"{where}: folder {folder!r} is not a folder number (0, 1, ...)")
        if not isinstance(entry["id_num"], (int, str)) or isinstance(entry["id_num"], bool):
            raise DatasetError(f"{where}: id_num {entry['id_num']!r} is not a subject number or name")
        if box not in (None, []) and (not isinstance(box, list) or len(box) != 8 or not all(map(_is_number, box))):
            raise DatasetError(f"{where}: aligned_bbox {box!r} is not 8 numbers (corners A, B, C, D)")
        subject = f"{entry.get('database', path.stem)}:{entry['id_num']}"
        if first_folder.setdefault(subject, (folder, where))[0] != folder:
            raise DatasetError(f"{where}: subject {subject} is in folder {folder} here and in folder "
                               f"{first_folder[subject][0]} at {first_folder[subject][1]}; a subject is in one folder")
        image = root / entry["img_path"]
        reason = LEFT_OUT[0] if age == -1 else LEFT_OUT[1] if not box else None if image.is_file() else LEFT_OUT[2]
        if reason:
            left_out[reason].append(entry["img_path"])
            continue
        samples.append(Sample(str(image), float(age), subject=subject, source=where, box=tuple(box)))
        folders.append(folder)
    return samples, folders, left_out


def _split_folders(path: Path, samples: list, folders: list, split_index: int) -> tuple:
    """The (train, val, test) folders of split `split_index` of one database: BENCHMARK_SPLITS for folders
    0-9, SINGLE_SPLIT for 0-2; a database whose folders are its subjects (FG-NET: 1-82, one subject each) is
    left out one folder at a time: test is folder `split_index`, val a seeded VAL_FRACTION of the others
    (see _facebase), train the rest."""
    found = sorted(set(folders))
    if set(found) <= {0, 1, 2}:
        if split_index != 0:
            raise ValueError(f"{path}: folders 0-2, the benchmark's single split: --split-index must be 0")
        return SINGLE_SPLIT
    if set(found) <= set(range(10)):
        if split_index >= len(BENCHMARK_SPLITS):
            raise ValueError(f"{path}: folders 0-9, the benchmark's five splits: --split-index must be 0..4")
        return BENCHMARK_SPLITS[split_index]
    subjects_of = {}
    for sample, folder in zip(samples, folders):
        subjects_of.setdefault(folder, set()).add(sample.subject)
    shared = next((f for f in found if len(subjects_of[f]) > 1), None)
    if shared is not None:
        culprit = next(s for s, f in zip(samples, folders) if f > 9)
        raise DatasetError(f"{culprit.source}: folder {folders[samples.index(culprit)]} lies outside the five "
                           f"splits' 0-9, and the folders are not one subject each (folder {shared} holds "
                           f"{len(subjects_of[shared])}), as a leave-one-subject-out database's are")
    if split_index not in subjects_of:
        raise ValueError(f"{path}: one subject per folder ({found[0]}-{found[-1]}), left out one at a time: "
                         f"--split-index must name a folder, not {split_index}")
    return None


def _facebase(root: Path, fold: int, seed: int, split: str, database=None, margin: float = ALIGN_MARGIN,
              crop_size: Optional[int] = None):
    """The unified benchmark: split `fold` (--split-index) of one database, or every entry of one or more
    databases with split "all" (cross-dataset testing: then they are the test split, train and val are
    empty). Entries left out are counted in one warning per reason."""
    _check_root("facebase", root)
    if not database:
        raise DatasetError(f"facebase: no database (--database: the benchmark's JSON file) for the images under {root}")
    if crop_size is None:
        raise ValueError("facebase needs crop_size: the model's input enlarged by the margin (aligned_crop_size)")
    paths = [Path(os.path.abspath(p)) for p in ([database] if isinstance(database, (str, Path)) else database)]
    if split != "all" and len(paths) > 1:
        raise ValueError(f"{len(paths)} databases: several are tested whole across datasets (split all); a "
                         f"split of train/val/test is taken from one")
    samples, folders, left_out = [], [], {reason: [] for reason in LEFT_OUT}
    for path in paths:
        more, more_folders, more_left_out = _database(path, root)
        samples, folders = samples + more, folders + more_folders
        for reason, img_paths in more_left_out.items():
            left_out[reason] += img_paths
    for reason, img_paths in left_out.items():
        if img_paths:
            warnings.warn(f"facebase: left out {len(img_paths)} entries of {', '.join(p.name for p in paths)}: "
                          f"{reason} (e.g. {', '.join(img_paths[:3])})")
    if split == "all":
        return samples, [], lambda part: samples if part in ("test", "all") else [], True, left_out
    sets = _split_folders(paths[0], samples, folders, fold)
    if sets is None:  # leave one subject out: folder `fold` is the test subject
        held_out = {s.subject for s, f in zip(samples, folders) if f == fold}
        return samples, [], lambda part: _fold_split(samples, part, held_out, fold, seed), True, left_out
    of_part = dict(zip(("train", "val", "test"), sets))
    return samples, [], lambda part: [s for s, f in zip(samples, folders) if f in of_part[part]], True, left_out


def _single_split(name: str, fold: int):
    if fold != 0:
        raise ValueError(f"{name} has a single split; fold must be 0, not {fold}")


def _rows(samples: list, limit: int = 3) -> str:
    """Where samples came from ("file:line", else the image path), the first few, for a message."""
    shown = ", ".join(s.source or s.path for s in samples[:limit])
    return shown + (f" and {len(samples) - limit} more" if len(samples) > limit else "")


def check_split_integrity(name: str, parts: dict, subject_exclusive: bool = True):
    """Raise DatasetError unless train/val/test (parts: split -> [Sample]) hold every image once (paths
    compared canonically: symlinks and '..' resolved) and, where subject_exclusive, every subject in
    exactly one split. The message names the rows (or files) at fault."""
    first = {}
    for split, samples in parts.items():
        for sample in samples:
            key = os.path.realpath(sample.path)
            if key in first:
                raise DatasetError(f"{name}: {_rows([first[key], sample])} are the same image {key}; "
                                   f"list each image once")
            first[key] = sample
    if not subject_exclusive:
        return
    splits_of = {}  # subject -> {split: [Sample]}
    for split, samples in parts.items():
        for sample in samples:
            if sample.subject is not None:
                splits_of.setdefault(sample.subject, {}).setdefault(split, []).append(sample)
    shared = {subject: where for subject, where in splits_of.items() if len(where) > 1}
    if shared:
        subject, where = sorted(shared.items())[0]
        sides = "; ".join(f"{split}: {_rows(samples)}" for split, samples in where.items())
        raise DatasetError(f"{name}: subject {subject!r} is in {len(where)} splits ({sides}); "
                           f"{len(shared)} subject(s) cross splits; a subject must be in exactly one split")


def build_dataset(name: str, root=None, split: str = "train", fold: int = 0,
                  transform: Optional[Callable] = None, seed: int = 0, drop_unreadable: bool = False,
                  **options) -> AgeDataset:
    """The split of a dataset in DATASETS, read from root (unused for "synthetic"). seed fixes the split;
    fold selects the test fold of fold protocols (fgnet, morph2 subject5fold). Every split is built and
    checked with check_split_integrity before one is returned. drop_unreadable: see AgeDataset."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    unknown = set(options) - OPTIONS.get(name, set())
    if unknown:
        raise ValueError(f"{name} does not take option(s) {sorted(unknown)}; it takes "
                         f"{sorted(OPTIONS.get(name, set())) or 'none'}")
    if name == "synthetic":
        _single_split(name, fold)
        return SyntheticAgeDataset(split, seed=seed, transform=transform, drop_unreadable=drop_unreadable,
                                   **options)
    if root is None:
        raise ValueError(f"{name} needs a data root")
    root = Path(os.path.abspath(Path(root).expanduser()))
    left_out = None
    if name == "facebase":
        samples, ignored, select, exclusive, left_out = _facebase(root, fold, seed, split, **options)
    elif name == "fgnet":
        samples, ignored, select, exclusive = _fgnet(root, fold, seed)
    elif name == "morph2":
        samples, ignored, select, exclusive = _morph2(root, fold, seed, **options)
    else:
        _single_split(name, fold)
        if name == "appa-real":
            samples, ignored, select, exclusive = _appa_real(root, **options)
        else:
            samples, ignored, select, exclusive = {"utkface": _utkface, "cacd": _cacd, "agedb": _agedb,
                                                   "csv": _csv}[name](root, seed)
    parts = {part: select(part) for part in ("train", "val", "test")}
    parts["calibration"] = split_validation(parts["val"], "calibration", seed)
    parts["val"] = split_validation(parts["val"], "val", seed)
    check_split_integrity(name, parts, exclusive)
    chosen = samples if split == "all" else parts[split]
    if not chosen and split != "calibration":   # an empty calibration part: train.py says so, calibrates nothing
        raise DatasetError(f"{name}: the {split} split under {root} is empty")
    if name == "facebase":
        dataset = AlignedFaces(chosen, transform, options.get("margin", ALIGN_MARGIN), options["crop_size"],
                               left_out, drop_unreadable)
    else:
        dataset = AgeDataset(chosen, transform, ignored, drop_unreadable)
    dataset.root = str(root.parent if root.is_file() else root)
    return dataset


# --------------------------------------------------------------------------- dataset identity

def index_entries(dataset: AgeDataset, split: str) -> list:
    """[relative path, size in bytes, age, age_std, subject, split] per sample, and its box where it has
    one (the benchmark's databases): what the dataset is made of, with paths relative to its root (so a
    moved copy reads the same) and sizes standing in for the content (hashing every image would cost a
    full read of the dataset at every start)."""
    root = dataset.root
    entries = []
    for s in dataset.samples:
        relative = os.path.relpath(s.path, root) if root else s.path
        size = os.stat(s.path).st_size if root and os.path.exists(s.path) else -1
        entries.append([relative, size, s.age, s.age_std, s.subject, split] + ([list(s.box)] if s.box else []))
    return entries


def fingerprint(entries: list) -> str:
    """SHA-256 of the sorted (relative path, size, labels, box) of index_entries rows: the split they fell
    in is left out, as it follows from the data and the run's seed, fold and protocol."""
    rows = sorted(json.dumps(entry[:5] + entry[6:], ensure_ascii=False) for entry in entries)
    return hashlib.sha256("\n".join(rows).encode("utf-8", "surrogateescape")).hexdigest()


def describe_change(old: list, new: list, limit: int = 3) -> str:
    """What differs between two index_entries lists, in words: files added, removed, changed in size
    or label, with a few names each ("" when nothing does)."""
    before = {e[0]: tuple(e[1:5]) + tuple(map(tuple, e[6:])) for e in old}
    after = {e[0]: tuple(e[1:5]) + tuple(map(tuple, e[6:])) for e in new}
    kinds = {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
             "changed in size": sorted(p for p in set(before) & set(after) if before[p][0] != after[p][0]),
             "relabelled": sorted(p for p in set(before) & set(after)
                                  if before[p][0] == after[p][0] and before[p] != after[p])}
    return "; ".join(f"{len(paths)} file(s) {kind} (e.g. {', '.join(paths[:limit])})"
                     for kind, paths in kinds.items() if paths)


# --------------------------------------------------------------------------- synthetic data

_HAIR = np.array([[0.08, 0.06, 0.05], [0.25, 0.15, 0.08], [0.45, 0.30, 0.15],
                  [0.80, 0.68, 0.40], [0.55, 0.25, 0.10]])  # black, dark brown, brown, blond, red
_HAIR_NAMES = ("black", "dark brown", "brown", "blond", "red")
_SKIN_NAMES = ("light", "medium", "dark")
_SKIN_LIGHT, _SKIN_DARK = np.array([0.96, 0.80, 0.69]), np.array([0.42, 0.27, 0.18])


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def render_synthetic(age: float, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A face-like drawing (NOT a face) of the given age: (size, size, 3) uint8 (see draw_synthetic)."""
    return draw_synthetic(age, rng, size)[0]


def draw_synthetic(age: float, rng: np.random.Generator, size: int = 64):
    """A face-like drawing (NOT a face) of the given age and what it shows: ((size, size, 3) uint8,
    {"hair": colour name, "skin": tone name, "background": colour name}), the words a caption may use.

    Age shows through graded cues, as in a face: up to ~18 the eyes sit lower, are larger and the head is
    rounder (child proportions); from ~25 forehead lines appear one by one and cheek folds darken; from
    ~30 the hair greys, from ~45 the hairline recedes, from ~55 age spots appear; skin texture coarsens
    over the whole range. Nuisances independent of age: position, scale, tilt, background colour and
    gradient, skin tone, hair colour, brightness, contrast, pixel noise. So no pixel or corner tells the
    age; a model has to find the face and read it. The face fills most of the frame, as in the aligned
    crops of UTKFace or MORPH II (centre within 0.1 of the middle, half-width 0.5-0.65 of the image's):
    at the demo CLIP's 32 pixels the child cues span only a few pixels, and a smaller face loses them
    (a demo CLIP then misread the children's ages: bench/README.md#what-was-tried)."""
    lin = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)  # float32: faster than NumPy's default float64
    x, y = lin[None, :], lin[:, None]  # (1, S), (S, 1): image coordinates in [-1, 1]
    pixel = 2 / size
    child = min(age / 18, 1.0)  # 0 at birth, 1 once adult proportions are reached
    old = float(np.clip((age - 20) / 60, 0, 1))

    cx, cy = rng.uniform(-0.1, 0.1, 2)
    theta = rng.uniform(-0.3, 0.3)
    rx = rng.uniform(0.5, 0.65)
    ry = rx * (1.0 + 0.3 * child)  # children's heads are rounder
    cos, sin = math.cos(theta), math.sin(theta)
    u = (cos * (x - cx) + sin * (y - cy)) / rx  # (S, S) face coordinates: the face is the unit disc
    v = (-sin * (x - cx) + cos * (y - cy)) / ry
    r = np.sqrt(u * u + v * v)

    def band(distance, scale):  # soft 0..1 mask: 1 inside, anti-aliased over one pixel at the border
        return np.clip(0.5 - distance * scale / pixel, 0, 1)

    def line(distance, scale, width=0.7):  # soft line of about `width` pixels
        return np.exp(-0.5 * (distance * scale / pixel / width) ** 2)

    # background: a random colour with a random linear gradient
    phi = rng.uniform(0, 2 * math.pi)
    gradient = (math.cos(phi) * x + math.sin(phi) * y)[..., None]  # (S, S, 1)
    background = rng.uniform(0.05, 0.95, 3)
    image = _f32(background) + gradient * _f32(rng.uniform(-0.2, 0.2, 3))  # (S, S, 3)

    # skin, with texture that coarsens with age (noise drawn at half resolution so it survives resizing)
    tone = rng.uniform()
    skin = _f32((1 - tone) * _SKIN_LIGHT + tone * _SKIN_DARK + rng.normal(0, 0.03, 3))
    half = (size + 1) // 2
    texture = rng.standard_normal((half, half), dtype=np.float32).repeat(2, 0).repeat(2, 1)[:size, :size]
    shade = 1 + (0.01 + 0.08 * age / 100) * texture  # (S, S)

    eye_v = 0.22 - 0.30 * child  # eyes low in a child's face, near the middle in an adult's
    lines = np.zeros((size, size), np.float32)
    for j in range(int(np.clip((age - 25) / 12, 0, 5))):  # forehead lines, one more every 12 years
        lines = np.maximum(lines, line(v - (eye_v - 0.25 - 0.11 * j + 0.08 * u * u), ry) * band(np.abs(u) - 0.5, rx))
    fold = np.abs(np.abs(u) - (0.22 + 0.35 * (v - 0.15)))  # cheek folds from the nose to the mouth corners
    lines = np.maximum(lines, min(old / 0.6, 1.0) * line(fold, rx) * ((v > 0.15) & (v < 0.6)))
    shade = shade * (1 - (0.1 + 0.3 * old) * lines)
    for _ in range(int(np.clip((age - 55) / 7, 0, 6))):  # age spots
        su, sv = rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.7)
        shade = shade * (1 - 0.25 * band(np.sqrt((u - su) ** 2 + (v - sv) ** 2) - 0.06, rx))
    face = band(r - 1, min(rx, ry))[..., None]  # (S, S, 1)
    image = image * (1 - face) + face * skin * shade[..., None]

    # eyes (white with a dark iris) and mouth
    eye_r = 0.17 - 0.07 * child
    for side in (-1, 1):
        d = np.sqrt(((u - side * 0.38) / eye_r) ** 2 + ((v - eye_v) / (0.6 * eye_r * rx / ry)) ** 2)
        white, iris = band(d - 1, eye_r * rx)[..., None], band(d - 0.55, eye_r * rx)[..., None]
        image = image * (1 - white) + white * 0.92
        image = image * (1 - iris) + iris * rng.uniform(0.05, 0.3)
    mouth = (line(v - (0.62 - 0.12 * child), ry, 0.9) * band(np.abs(u) - 0.28, rx))[..., None]
    image = image * (1 - 0.5 * mouth) + 0.5 * mouth * _f32([0.55, 0.2, 0.2])

    # hair: a cap above a hairline that recedes with age; colour greys towards white; sparse in babies
    grey = float(np.clip((age - 30) / 45, 0, 1))
    hair_index = rng.integers(len(_HAIR))
    base = _HAIR[hair_index] + rng.normal(0, 0.03, 3)
    hair = _f32((1 - grey) * base + grey * rng.uniform(0.75, 0.95))
    hairline = -0.35 - 0.35 * float(np.clip((age - 45) / 40, 0, 1))
    cap = (band(r - 1.12, min(rx, ry)) * band(v - hairline, ry) * min(1.0, 0.3 + age / 4))[..., None]
    image = image * (1 - cap) + cap * hair

    # global nuisance: contrast, brightness, sensor noise
    image = (image - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08)
    image = image + 0.02 * rng.standard_normal(image.shape, dtype=np.float32)
    shown = {"hair": "white" if grey > 0.8 else "grey" if grey > 0.4 else _HAIR_NAMES[hair_index],
             "skin": _SKIN_NAMES[min(int(tone * 3), 2)], "background": colour_name(background)}
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), shown


class SyntheticAgeDataset(AgeDataset):
    """The demo data: render_synthetic images, generated on the fly, deterministic from (seed, split,
    index). Integer ages uniform on [min_age, max_age]. n: this split's size, or a dict per split."""

    SIZES = {"train": 2000, "val": 600, "test": 300}   # val: drawn, then halved (split_validation)
    _CODES = {"train": 0, "val": 1, "test": 2}

    def __init__(self, split: str = "train", seed: int = 0, transform: Optional[Callable] = None,
                 n=None, image_size: int = 64, min_age: int = 0, max_age: int = 100, drop_unreadable: bool = False):
        sizes = dict(self.SIZES)
        if isinstance(n, dict):
            sizes.update(n)
        elif n is not None:
            sizes = {name: int(n) for name in sizes}
        if not 0 <= min_age <= max_age <= AGE_RANGE[1]:
            raise ValueError(f"synthetic: need 0 <= min_age <= max_age <= 120, got {min_age}, {max_age}")
        self.seed, self.image_size = seed, image_size
        self._keys, samples = [], []
        for name in (["train", "val", "calibration", "test"] if split == "all" else [split]):
            drawn = "val" if name == "calibration" else name   # val and calibration: halves of the drawn val
            code = self._CODES[drawn]
            ages = np.random.default_rng([seed, code, 1 << 20]).integers(min_age, max_age + 1, sizes[drawn])
            part = [Sample(f"synthetic:{drawn}/{i}", float(age)) for i, age in enumerate(ages)]
            if drawn == "val":
                part = split_validation(part, name, seed)
            self._keys += [(code, int(s.path.rsplit("/", 1)[1])) for s in part]
            samples += part
        super().__init__(samples, transform, drop_unreadable=drop_unreadable)

    def image(self, index: int) -> Image.Image:
        code, i = self._keys[index]
        rng = np.random.default_rng([self.seed, code, i])
        return Image.fromarray(render_synthetic(self.samples[index].age, rng, self.image_size))


# --------------------------------------------------------------------------- captioned drawings (demo CLIP)
# The demo's CLIP is pretrained as CLIP was, on image-caption pairs, so that its text tower learns the
# age words from the pictures. Captions describe a drawing as web captions describe a person: the age in
# one of several wordings, then some of the other things the drawing shows.

_COLOURS = {"black": (0.1, 0.1, 0.1), "grey": (0.5, 0.5, 0.5), "white": (0.9, 0.9, 0.9),
            "red": (0.8, 0.15, 0.15), "orange": (0.85, 0.5, 0.1), "yellow": (0.85, 0.8, 0.15),
            "green": (0.2, 0.7, 0.2), "teal": (0.15, 0.6, 0.6), "blue": (0.15, 0.25, 0.8),
            "purple": (0.5, 0.2, 0.7), "pink": (0.9, 0.5, 0.7), "brown": (0.45, 0.3, 0.15)}
_DECADES = ("teens", "twenties", "thirties", "forties", "fifties", "sixties", "seventies", "eighties",
            "nineties")
# (first age, last age, wording); {child}/{adult}/{teen} are filled with a noun of the drawn gender
_STAGES = ((0, 1, "a baby"), (0, 1, "a newborn"), (1, 3, "a toddler"), (4, 12, "a little {child}"),
           (4, 12, "a young {child}"), (13, 19, "a teenage {child}"), (13, 19, "a teenager"),
           (20, 34, "a young {adult}"), (35, 44, "an adult {adult}"), (40, 60, "a middle-aged {adult}"),
           (60, 74, "an older {adult}"), (65, 120, "a senior {adult}"), (75, 120, "an elderly {adult}"),
           (100, 120, "a centenarian"))
_NUMBERS = ("a photo of a {n} year old person.", "a {n} year old {noun}", "a {n}-year-old {noun}",
            "{noun}, {n} years old", "{noun} aged {n}", "age {n}", "a photo of a {n} year old {noun}.")


def colour_name(rgb) -> str:
    """The nearest of a dozen colour words to an RGB triple in [0, 1]."""
    return min(_COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, _COLOURS[name])))


def age_phrase(age: int, rng: np.random.Generator) -> str:
    """The age in one of three wordings, drawn at random: a number ("a 42 year old man"), a decade
    ("a woman in her early forties", from 13) or a life stage ("a toddler", "an elderly man")."""
    female = rng.uniform() < 0.5
    child, adult, pronoun = ("girl", "woman", "her") if female else ("boy", "man", "his")
    noun = child if age < 18 else adult
    form = rng.choice(3, p=(0.5, 0.25, 0.25))   # numbers half the time: the prompts' own wording
    if form == 1 and 13 <= age < 100:
        decade = _DECADES[max(age // 10 - 1, 0)]
        part = age % 10 if age >= 20 else None
        when = "" if part is None or rng.uniform() < 0.5 else ("early " if part < 4 else "mid " if part < 7 else "late ")
        return f"a {noun} in {pronoun} {when}{decade}"
    if form == 2:
        stages = [wording for first, last, wording in _STAGES if first <= age <= last]
        return stages[rng.integers(len(stages))].format(child=child, adult=adult)
    return _NUMBERS[rng.integers(len(_NUMBERS))].format(n=age, noun=noun)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(age: int, shown: dict, rng: np.random.Generator, age_rate: float = 1.0) -> str:
    """A caption of one drawing: the age phrase (with probability age_rate; otherwise "a photo of a
    person", as most web captions leave the age out), then each of hair, skin and background (as
    draw_synthetic reports them) with probability 1/2, in random order."""
    details = [f"with {shown['hair']} hair", f"with {shown['skin']} skin", f"on {_article(shown['background'])} {shown['background']} background"]
    kept = [details[i] for i in rng.permutation(3) if rng.uniform() < 0.5]
    phrase = age_phrase(age, rng).rstrip(".")
    if age_rate < 1 and rng.uniform() < 1 - age_rate:   # no draw at 1: the default corpus is unchanged
        phrase = "a photo of a person"
    return ", ".join([phrase] + kept)


class CaptionedDrawings(Dataset):
    """The demo CLIP's pretraining corpus: n (drawing, tokenised caption) pairs, deterministic from the
    seed. Integer ages uniform on [0, 100]. Drawn from the random streams [seed, 3, i], which no demo split
    uses (those are [seed, 0|1|2, i]), so no drawing of the demo's train, val or test splits is in it.
    Items: (image tensor after transform, (context_length,) token ids). age_rate: the share of captions
    that state the age (caption)."""

    CODE = 3

    def __init__(self, n: int, seed: int, transform: Callable, image_size: int, context_length: int,
                 age_rate: float = 1.0):
        self.n, self.seed, self.transform = n, seed, transform
        self.image_size, self.context_length, self.age_rate = image_size, context_length, age_rate

    def __len__(self) -> int:
        return self.n

    def pair(self, index: int):
        """(RGB PIL image, caption text, age) of item index."""
        rng = np.random.default_rng([self.seed, self.CODE, index])
        age = int(rng.integers(0, 101))
        image, shown = draw_synthetic(age, rng, self.image_size)
        return Image.fromarray(image), caption(age, shown, rng, self.age_rate), age

    def __getitem__(self, index: int):
        image, text, _ = self.pair(index)
        return self.transform(image), clip_loader.tokenize(text, self.context_length)[0]


# --------------------------------------------------------------------------- loading

def _seed_worker(worker_id: int):
    # DataLoader seeds torch per worker from its generator; numpy and random need the same treatment
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """The batches of one process: the dataset in one random order, cut into global batches of
    batch_size * world images, of which process `rank` takes the rank-th slice of batch_size. Every process
    draws the same order (the same seeded generator), so one process with batch B and N processes with
    B / N each see the same global batches, whatever the launcher. The order is drawn from `generator`
    when iteration starts, after the DataLoader drew its workers' base seed from it: as DataLoader's own
    shuffling (RandomSampler) does, so one process draws exactly the batches it drew with shuffle=True.
    drop_last: leave out the last partial global batch; one process without it keeps it (it cannot be
    split evenly among several). epoch_seed (epoch -> seed): the order of each epoch (set_epoch) is drawn
    as a new DataLoader seeded with it would draw, so one loader with persistent workers serves a run."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
                 drop_last: bool = True, epoch_seed: Optional[Callable] = None):
        if not drop_last and world > 1:
            raise ValueError("GlobalBatchSampler: several processes need drop_last (equal slices)")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch_seed, self.epoch = epoch_seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        full = self.n // (self.batch_size * self.world)
        return full if self.drop_last or self.n % self.batch_size == 0 else full + 1

    def __iter__(self):
        if self.epoch_seed is not None:   # the generator a new DataLoader of this epoch would have: seeded,
            self.generator.manual_seed(self.epoch_seed(self.epoch))   # and its workers' seed drawn first
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(self.n, generator=self.generator).tolist()
        size = self.batch_size * self.world
        for start in range(0, len(self) * size, size):
            yield order[start + self.rank * self.batch_size:start + (self.rank + 1) * self.batch_size]


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0, seed: int = 0,
                 device="cpu", drop_last: Optional[bool] = None,
                 epoch_seed: Optional[Callable] = None) -> DataLoader:
    """A DataLoader: for training shuffled by GlobalBatchSampler (seeded; dropping the last partial batch);
    workers kept alive between epochs; pinned memory when feeding CUDA. batch_size is this process's
    share: under torch.distributed each process takes its slice of every global batch (batch_size x world
    size). epoch_seed (epoch -> seed): one loader serves every epoch, set_epoch(loader, epoch) choosing
    its order; without it, a new loader (or a new seed) each epoch gives a new order. Evaluation loaders are not
    sharded, so metrics cover every image exactly once; evaluate on one rank."""
    if drop_last is None:
        drop_last = train and len(dataset) > batch_size
    generator = torch.Generator().manual_seed(seed)
    if not train:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          persistent_workers=num_workers > 0, pin_memory=torch.device(device).type == "cuda",
                          drop_last=drop_last, generator=generator, worker_init_fn=_seed_worker)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    sampler = GlobalBatchSampler(len(dataset), batch_size, generator, rank, world, drop_last or world > 1, epoch_seed)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=torch.device(device).type == "cuda", generator=generator, worker_init_fn=_seed_worker)


def set_epoch(loader: DataLoader, epoch: int):
    """Tell the training loader's GlobalBatchSampler which epoch starts, so each epoch gets its own order
    (no-op for other loaders)."""
    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)


# --------------------------------------------------------------------------- aligning a folder
# `python data.py align --data-root RAW --out ALIGNED` aligns a raw dataset folder once, as the benchmark
# aligns its databases: the face nearest the image centre, its aligned_box from MTCNN's landmarks, the
# crop written under the same relative name, so every loader above reads ALIGNED as it read RAW.

MANIFEST_COLUMNS = ["path", "aligned_bbox", "landmarks", "faces_found"]


def align_folder(root, out, size: int = 281, margin: float = ALIGN_MARGIN, detect: Optional[Callable] = None,
                 progress: bool = False) -> dict:
    """Write the aligned crop (crop_aligned, size x size) of the face nearest the centre of every image
    under root to out, under the same relative path, and out/manifest.csv (MANIFEST_COLUMNS: the box and
    the five landmarks as space-separated numbers, empty without a face; faces_found counts MTCNN's faces).
    detect: image -> [Face] (default: face_detector()). Returns {"images", "aligned", "no face" (relative
    paths), "unreadable" ((relative path, reason))}."""
    root, out = Path(os.path.abspath(root)), Path(os.path.abspath(out))
    _check_root("align", root)
    if out == root or root in out.parents:
        raise ValueError(f"align: --out {out} lies inside --data-root {root}; write the crops elsewhere")
    detect = detect or face_detector()
    paths = _image_files(root)
    if progress:
        from tqdm import tqdm
        paths = tqdm(paths, desc="aligning", unit="img")
    rows, no_face, unreadable = [], [], []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        try:
            image = load_image(path)
        except Exception as error:  # PIL raises many types on corrupt data
            unreadable.append((relative, f"{type(error).__name__}: {error}"))
            continue
        faces = detect(image)
        if not faces:
            no_face.append(relative)
            rows.append([relative, "", "", 0])
            continue
        centre = np.array(image.size) / 2
        face = min(faces, key=lambda f: np.hypot(*(np.reshape(f.aligned_box(), (4, 2)).mean(0) - centre)))
        box = face.aligned_box()
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        crop = crop_aligned(image, box, size, margin)
        crop.save(target, **({"quality": 95} if target.suffix.lower() in (".jpg", ".jpeg") else {}))
        rows.append([relative, " ".join(map(str, box)),
                     " ".join(f"{v:.1f}" for point in face.landmarks for v in point), len(faces)])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([MANIFEST_COLUMNS, *rows])
    return {"images": len(rows) + len(unreadable), "aligned": len(rows) - len(no_face), "no face": no_face,
            "unreadable": unreadable}


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="data.py commands")
    commands = parser.add_subparsers(dest="command", required=True)
    align = commands.add_parser("align", help="align a raw dataset folder once (MTCNN, pip install -e \".[faces]\")")
    align.add_argument("--data-root", required=True, help="the raw dataset folder (searched recursively)")
    align.add_argument("--out", required=True, help="folder for the aligned crops, under the same relative names")
    align.add_argument("--size", type=int, default=aligned_crop_size(256), help="side of the crops in pixels "
                       "(default: the benchmark's 281, 256 enlarged by the margin)")
    align.add_argument("--margin", type=float, default=ALIGN_MARGIN, help="fraction of the box added on each side")
    align.add_argument("--device", default="cpu", help="where MTCNN runs: cpu | cuda")
    args = parser.parse_args(argv)
    try:
        counts = align_folder(args.data_root, args.out, args.size, args.margin, face_detector(args.device),
                              progress=True)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"align: {error}") from None
    print(f"aligned {counts['aligned']} of {counts['images']} images into {args.out} "
          f"(manifest: {Path(args.out) / 'manifest.csv'})")
    if counts["no face"]:
        print(f"{len(counts['no face'])} image(s) without a face (left out): {', '.join(counts['no face'][:10])}"
              f"{' ...' if len(counts['no face']) > 10 else ''}")
    if counts["unreadable"]:
        print(f"{len(counts['unreadable'])} unreadable image(s) left out: "
              + ", ".join(f"{path} ({reason})" for path, reason in counts["unreadable"][:10]))


if __name__ == "__main__":
    main()
