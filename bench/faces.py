"""Faces in raw photos: which detector, and what --detect-faces costs.

1. Detector choice: faces found and milliseconds per photo for OpenCV's Haar cascades and MTCNN
   (facenet-pytorch) on the photos that ship inside installed packages (scikit-image's astronaut,
   camera, chelsea (a cat), coffee, rocket, horse, hubble, motorcycle; matplotlib's Grace Hopper), a
   two-person picture made from two of them, and scikit-image's LFW subset (100 face crops, 100 non-face
   patches, padded and enlarged to 196 px).
2. With --ckpt: images per second of `eval.py --images` (eval.predict_files) on the bundled photos,
   without and with --detect-faces.

    python bench/faces.py --ckpt runs/demo/best.pt     # needs scikit-image, matplotlib, opencv-python-headless<5, .[faces]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as ev  # noqa: E402  (first: it sets OMP_WAIT_POLICY before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def bundled_photos():
    """{name (expected faces): RGB PIL image} from scikit-image and matplotlib."""
    import matplotlib.cbook
    import skimage.data as sd
    rgb = lambda a: Image.fromarray(a if a.ndim == 3 else np.stack([a] * 3, -1)).convert("RGB")
    photos = {"astronaut (1)": rgb(sd.astronaut()), "camera (1)": rgb(sd.camera()),
              "grace_hopper (1)": Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"),
              "chelsea, a cat (0)": rgb(sd.chelsea()), "coffee (0)": rgb(sd.coffee()), "rocket (0)": rgb(sd.rocket()),
              "horse (0)": rgb((sd.horse() * 255).astype(np.uint8)), "hubble (0)": rgb(sd.hubble_deep_field()),
              "motorcycle (0)": rgb(sd.stereo_motorcycle()[0])}
    pair = Image.new("RGB", (512, 300))
    pair.paste(photos["astronaut (1)"].resize((256, 256)), (0, 0))
    pair.paste(photos["grace_hopper (1)"].resize((256, 300)), (256, 0))
    photos["astronaut + hopper, half size (2)"] = pair
    return photos


def lfw_patches():
    """(faces, non-faces): scikit-image's LFW subset, 25 px patches padded by 12 px and enlarged to 196 px."""
    import skimage.data as sd
    patches = [Image.fromarray(np.pad((np.clip(p, 0, 1) * 255).astype(np.uint8), 12, mode="edge"))
               .resize((196, 196)).convert("RGB") for p in sd.lfw_subset()]
    return patches[:100], patches[100:]


def detectors():
    """{name: PIL image -> list of boxes}: two Haar cascades (opencv's usual settings) and MTCNN."""
    import cv2

    def haar(file):
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + file)
        return lambda image: list(cascade.detectMultiScale(cv2.equalizeHist(np.asarray(image.convert("L"))),
                                                           scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)))
    return {"Haar frontalface_default": haar("haarcascade_frontalface_default.xml"),
            "Haar frontalface_alt2": haar("haarcascade_frontalface_alt2.xml"),
            f"MTCNN (p >= {ev.data.FACE_MIN_PROBABILITY})": ev.face_detector("cpu")}


def compare_detectors():
    """A table, one row per photo (expected faces in brackets), one column per detector: faces found."""
    photos, (faces, non_faces) = bundled_photos(), lfw_patches()
    columns = {}
    for name, detect in detectors().items():
        detect(photos["astronaut (1)"])   # warm-up
        start = time.perf_counter()
        counts = [len(detect(image)) for image in photos.values()]
        ms = 1000 * (time.perf_counter() - start) / len(photos)
        columns[name] = counts + [sum(len(detect(p)) > 0 for p in faces),
                                  sum(len(detect(p)) > 0 for p in non_faces), f"{ms:.0f}"]
    rows = list(photos) + ["LFW faces found (100)", "LFW non-faces with a face (0)", "ms per photo"]
    print("| photo (faces) | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    for i, row in enumerate(rows):
        print(f"| {row} | " + " | ".join(str(c[i]) for c in columns.values()) + " |")


def throughput(ckpt, repeats):
    """Images per second of eval.predict_files on the bundled photos, without and with face detection."""
    import tempfile
    model, calibration = ev.load_model(ckpt)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, (name, image) in enumerate(bundled_photos().items()):
            paths.append(f"{folder}/{i}.jpg")
            image.save(paths[-1], quality=92)
        paths = paths * repeats
        print("| `eval.py --images` | photos | images/s |\n|---|---|---|")
        for label, detect in (("whole image", None), ("--detect-faces", ev.face_detector("cpu"))):
            ev.predict_files(model, paths[:4], calibration, 0.9, detect)   # warm-up
            start = time.perf_counter()
            ev.predict_files(model, paths, calibration, 0.9, detect)
            print(f"| {label} | {len(paths)} | {len(paths) / (time.perf_counter() - start):.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="a train.py checkpoint for the throughput table (none: detectors only)")
    p.add_argument("--repeats", type=int, default=5, help="passes over the bundled photos when timing")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    compare_detectors()
    if args.ckpt:
        throughput(args.ckpt, args.repeats)


if __name__ == "__main__":
    main()
