"""Files and options from elsewhere: a shared best.pt, a CLIP folder's configs, photos of any size. Each test
builds its bad file or image here and asserts the error type and its one line; the bombs (sizes that would
cost gigabytes before any check) also a time and memory bound. One test per class of unchecked value:
  1. the calibration in best.pt          2. the run config's structure       3. model-config bombs
  4. the CLIP record in best.pt          5. Hugging Face / open_clip configs 6. the shard index
  7. prompts longer than the context     8. --face-margin                    9. --images memory
 10. predict_images' image guards
"""
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_loader
import data
import eval as ev
import train
from model import MAX_FEEDBACK_STEPS, CILFCIAE, CILFConfig

ROOT = Path(__file__).resolve().parent.parent
SMALL = CILFConfig(depth=1, width=32, heads=2, feedback_hidden=32)


def memory_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def bounded(call, seconds, mib):
    """Run call (which must raise) and return its exception, asserting it took under `seconds` and raised
    this process's peak resident memory by under `mib` (the peak is reset first where Linux allows)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # VmHWM back to the current RSS
        measured = True
    except OSError:
        measured = False
    rss, start = memory_mib("VmRSS:"), time.perf_counter()
    with pytest.raises(Exception) as error:
        call()
    elapsed, rise = time.perf_counter() - start, memory_mib("VmHWM:") - rss
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    assert not measured or rise < mib, f"peak memory rose by {rise:.0f} MiB"
    return error.value


def one_line(error, kind, *needles):
    assert type(error) is kind or isinstance(error, kind), (type(error), error)
    message = str(error)
    assert "\n" not in message and len(message) < 600, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint as train.py writes one (tiny model, random demo CLIP, a calibration), and its path."""
    torch.manual_seed(0)
    clip = clip_loader.CLIP(**train.DEMO_CLIP)
    model = CILFCIAE(clip, SMALL)
    calibration = ev.calibrate(np.linspace(20, 60, 40), np.linspace(22, 58, 40), np.ones(40), "csv val")
    ckpt = {"model": model.state_dict(), "calibration": calibration,
            "config": {"train": {"dataset": "csv", "data_root": "/data/faces.csv", "dataset_options": {}, "fold": 0,
                                 "seed": 0, "lr": 1e-3},
                       "model": dataclasses.asdict(SMALL), "clip": {"source": "random", **ev.clip_record(clip)},
                       "data": {"fingerprint": "0" * 64, "images": 1, "root": "/data", "changes": []}},
            "data_index": [["a.png", 10, 30.0, None, None, "train"]]}
    path = tmp_path_factory.mktemp("good") / "best.pt"
    torch.save(ckpt, path)
    ev.load_checkpoint(path)   # the honest file passes
    return ckpt, path


def variant(good, folder, change, name="best.pt"):
    """good's checkpoint with change(ckpt) applied, saved under folder."""
    ckpt = copy.deepcopy(good[0])
    change(ckpt)
    path = folder / name
    torch.save(ckpt, path)
    return path


def refused(path, *needles):
    with pytest.raises(clip_loader.CheckpointError) as error:
        ev.load_model(path)
    return one_line(error.value, clip_loader.CheckpointError, f"{path}: ", *needles)


# --------------------------------------------------------------------------- 1. the calibration


@pytest.mark.parametrize("field, value, needle", [
    ("quantiles", {"0.9": {"normalised": -3.0, "plain": 5.0}}, "calibration.quantiles: level 0.9"),
    ("delta", float("nan"), "calibration.delta: 'nan' is not a finite number"),
    ("delta", "1.0", "calibration.delta: must be a number, not '1.0'"),
    ("quantiles", [1.0, 2.0], "calibration.quantiles: must be a dict of levels, not a list"),
    ("quantiles", {"1.5": {"normalised": 1.0, "plain": 1.0}}, "calibration.quantiles: level '1.5' is not"),
])
def test_a_calibration_train_py_cannot_have_written_is_refused(good, tmp_path, field, value, needle):
    path = variant(good, tmp_path, lambda c: c["calibration"].__setitem__(field, value))
    refused(path, needle)


def test_a_level_that_was_not_calibrated_names_the_levels_that_were(good):
    model, calibration = ev.load_model(good[1])
    with pytest.raises(ValueError) as error:
        ev.predict_images(model, Image.new("RGB", (40, 40)), calibration, level=0.85)
    one_line(error.value, ValueError, "level 0.85", "0.8, 0.9, 0.95")


# --------------------------------------------------------------------------- 2. the run config's structure


@pytest.mark.parametrize("change, needle", [
    (lambda c: c["config"].pop("train"), "config.train: missing"),
    (lambda c: c["config"].__setitem__("train", ["utkface"]), "config.train: must be a dict, not a list"),
    (lambda c: c["config"]["train"].__setitem__("fold", -1), "config.train.fold: must be an integer >= 0"),
    (lambda c: c["config"]["train"].__setitem__("dataset", "imagenet"), "config.train.dataset: must be one of"),
    (lambda c: c.__setitem__("data_index", [["a.png", 10]]), "data_index: entry 0 is not [path, size"),
    (lambda c: c["config"]["data"].pop("fingerprint"), "config.data.fingerprint: missing"),
    (lambda c: c["config"]["model"].__setitem__("label_sigma", "votes"), "config.model.label_sigma: must be one of"),
    (lambda c: c["config"]["train"].__setitem__("lr", [torch.ones(2)]), "config.train.lr: must be plain data, not "
                                                                       "a Tensor"),
    (lambda c: c["config"]["train"].__setitem__("method", "ce-baseline"),   # a CILFConfig under the baseline
     "config.model.prompt_template: is not a field of LinearBaselineConfig (the run's --method)"),
])
def test_a_run_config_of_the_wrong_structure_is_refused(good, tmp_path, change, needle):
    refused(variant(good, tmp_path, change), needle)


def test_train_py_refuses_it_in_one_line_on_resume_and_beside_a_new_run(good, tmp_path):
    path = variant(good, tmp_path, lambda c: c["config"].__setitem__("train", ["utkface"]), "last.pt")
    with pytest.raises(SystemExit) as stop:
        train.resume_checkpoint(Namespace(resume=True), tmp_path)
    one_line(stop.value, SystemExit, f"{path}: config.train: must be a dict")
    path.rename(tmp_path / "best.pt")   # a best.pt left in the folder of a new run is compared with it
    with pytest.raises(SystemExit) as stop:
        train.check_best_is_ours({"train": {}}, tmp_path)
    one_line(stop.value, SystemExit, f"{tmp_path / 'best.pt'}: config.train: must be a dict")
    # an option eval.py never reads, checked by train.py's parser: named, not reported as another run
    variant(good, tmp_path, lambda c: c["config"]["train"].__setitem__("lr", -1))
    with pytest.raises(SystemExit) as stop:
        train.check_best_is_ours({"train": {}}, tmp_path)
    one_line(stop.value, SystemExit, f"{tmp_path / 'best.pt'}: config.train.lr: must be a finite number > 0, not -1")


# --------------------------------------------------------------------------- 3. model-config bombs


@pytest.mark.parametrize("field, value, needle", [
    ("max_age", 3e6, "config.model.max_age: need 0 <= min_age < max_age <= 120, not min_age 0 and max_age 3e+06"),
    ("age_step", 1e-5, "config.model.age_step: CILFConfig: 0..100 in steps of 1e-05 makes more than 1201"),
    ("prompt_template", "a photo of a {:30000000} year old person.", "config.model.prompt_template: "),
    ("prompt_template", "x" * 200_000 + "{}", "template of 200002 characters is longer than any CLIP context"),
    ("width", 20000, "config.model: its sizes make fusion.in_proj.weight of shape (20000, 64), but the weights "
                     "hold (32, 64)"),
    ("depth", 10 ** 6, "fusion.blocks.999999.mlp.0.weight of shape (128, 32), but the weights hold none"),
    ("heads", 3, "config.model.heads: must divide the fusion width 32, not 3"),
    ("feedback_steps", 10 ** 9, "config.model.feedback_steps: must be an integer from 0 to 64, not 1000000000"),
    ("width", 2 ** 70, "config.model.width: must be an integer, not an integer of 71 bits"),
])
def test_model_config_bombs_are_refused_before_anything_is_built(good, tmp_path, field, value, needle):
    path = variant(good, tmp_path, lambda c: c["config"]["model"].__setitem__(field, value))
    error = bounded(lambda: ev.load_model(path), seconds=3, mib=64)
    one_line(error, clip_loader.CheckpointError, f"{path}: ", needle)


def test_the_residual_design_s_steps_are_bounded_in_the_file_and_on_the_command_line(good, tmp_path, capsys):
    """The residual design holds no weights per step, so no shape check sees its step count: a best.pt of
    10**9 steps would build and loop for hours at every prediction. One bound (model.MAX_FEEDBACK_STEPS),
    whatever the design, on the option and on the saved field."""
    residual = dataclasses.replace(SMALL, feedback_design="residual")
    torch.manual_seed(0)
    model = CILFCIAE(clip_loader.CLIP(**train.DEMO_CLIP), residual)

    def as_residual(steps):
        def change(ckpt):
            ckpt["model"] = model.state_dict()
            ckpt["config"]["model"] = dataclasses.asdict(dataclasses.replace(residual, feedback_steps=steps))
        return change
    ev.load_model(variant(good, tmp_path, as_residual(MAX_FEEDBACK_STEPS), "honest.pt"))   # the bound passes
    path = variant(good, tmp_path, as_residual(10 ** 9))
    error = bounded(lambda: ev.load_model(path), seconds=3, mib=64)
    one_line(error, clip_loader.CheckpointError, f"{path}: config.model.feedback_steps: must be an integer from 0 "
                                                 f"to {MAX_FEEDBACK_STEPS}, not 1000000000")
    assert train.parse_args(["--feedback-steps", str(MAX_FEEDBACK_STEPS)]).feedback_steps == MAX_FEEDBACK_STEPS
    with pytest.raises(SystemExit):
        train.parse_args(["--feedback-steps", str(MAX_FEEDBACK_STEPS + 1)])
    assert f"--feedback-steps: must be an integer from 0 to {MAX_FEEDBACK_STEPS}" in capsys.readouterr().err


def test_a_template_without_its_age_field_is_refused_in_the_file_and_on_the_command_line(good, tmp_path, capsys):
    path = variant(good, tmp_path, lambda c: c["config"]["model"].__setitem__("prompt_template", "a face."))
    refused(path, "config.model.prompt_template: 'a face.' must hold exactly one '{}'")
    with pytest.raises(SystemExit):
        train.parse_args(["--prompt-template", "a {0} year old {}"])
    assert "must hold exactly one '{}'" in capsys.readouterr().err


# --------------------------------------------------------------------------- 4. the CLIP record


@pytest.mark.parametrize("change, needle", [
    (lambda r: r.__setitem__("image_std", [0.2, 0.0, 0.3]), "image std must be three finite numbers > 0"),
    (lambda r: r.__setitem__("image_mean", [0.5, 0.5]), "image mean must be three finite numbers (R, G, B), "
                                                        "not 2 values"),
    (lambda r: r.__setitem__("image_std", [0.2, float("nan"), 0.3]), "image std must be three finite"),
    (lambda r: r["settings"].__setitem__("vision_ln_eps", -1e-5), "setting vision_ln_eps = -1e-05 must be a finite"),
    (lambda r: r["settings"].__setitem__("text_eos_id", 10 ** 30), "text_eos_id = an integer of 100 bits must be "
                                                                  "None or a token id below 49408"),
    (lambda r: r["settings"].__setitem__("vision_head_width", 0), "vision_head_width = 0 must be a positive integer"),
    (lambda r: r["settings"].__setitem__("transformer_heads", 3), "transformer_heads = 3 cannot split the text width"),
])
def test_a_clip_record_that_would_break_prediction_is_refused(good, tmp_path, change, needle):
    path = variant(good, tmp_path, lambda c: change(c["config"]["clip"]))
    refused(path, "config.clip: ", needle)


# --------------------------------------------------------------------------- 5. Hugging Face / open_clip configs


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Hugging Face CLIPModel saved in 5 shards: width 64, two heads per tower."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tower = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=96)
    config = transformers.CLIPConfig(vision_config=dict(tower, num_attention_heads=2, image_size=32, patch_size=8),
                                     text_config=dict(tower, num_attention_heads=2, max_position_embeddings=16),
                                     projection_dim=48)
    folder = tmp_path_factory.mktemp("hf")
    transformers.CLIPModel(config).save_pretrained(folder, max_shard_size="100KB")
    clip_loader.load(folder)   # the honest folder loads
    return folder


def copy_folder(source, target, **replace):
    """source's files in target (shards as links), with the named files' contents replaced (or added)."""
    target.mkdir()
    for f in source.iterdir():
        if f.name.endswith(".safetensors"):
            (target / f.name).symlink_to(f)
        else:
            (target / f.name).write_bytes(f.read_bytes())
    for name, text in replace.items():
        (target / name).write_text(text)
    return target


def hf_config(folder, vision=None, text=None):
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"].update(vision or {})
    config["text_config"].update(text or {})
    return json.dumps(config)


@pytest.mark.parametrize("vision, text, processor, needle", [
    ({"hidden_size": 128}, {}, None, "states vision_width = 128, but the weights hold 64"),
    ({"num_attention_heads": 2.0}, {}, None, "vision_config.hidden_size 64 is not a multiple of num_attention_heads "
                                             "2.0 (two positive integers)"),
    ({}, {"layer_norm_eps": "1e-5"}, None, "setting text_ln_eps = '1e-5' must be a finite number > 0"),
    ({"layer_norm_eps": float("nan")}, {}, None, "setting vision_ln_eps = nan must be a finite number > 0"),
    ({"layer_norm_eps": -1e-5}, {}, None, "setting vision_ln_eps = -1e-05 must be"),
    ({}, {}, {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.0, 0.2, 0.2]}, "image std must be three finite numbers > 0"),
    ({}, {}, {"image_mean": [float("nan")] * 3}, "image mean must be three finite numbers"),
    ({}, {}, {"image_mean": 0.5}, "image mean must be three finite numbers (R, G, B), not 0.5"),
    ({}, {}, {"image_std": [0.2] * 5}, "not 5 values"),
    ({"image_size": 64}, {}, None, "image size (64, 64) with patches (8, 8) does not fit its 16 positions"),
])
def test_hugging_face_configs_are_checked_against_the_weights(hf_folder, tmp_path, vision, text, processor, needle):
    replace = {"config.json": hf_config(hf_folder, vision, text)}
    if processor is not None:
        replace["preprocessor_config.json"] = json.dumps(processor)
    folder = copy_folder(hf_folder, tmp_path / "clip", **replace)
    with pytest.raises(clip_loader.CheckpointError) as error:
        clip_loader.load(folder)
    one_line(error.value, clip_loader.CheckpointError, f"{folder}: ", needle)


@pytest.mark.parametrize("vision, pre, needle", [
    ({"width": 128}, {}, "states vision_width = 128, but the weights hold 96"),
    ({"head_width": 32.0}, {}, "setting vision_head_width = 32.0 must be a positive integer"),
    ({"norm_kwargs": {"eps": float("nan")}}, {}, "setting vision_ln_eps = nan must be a finite number > 0"),
    ({}, {"mean": [0.5]}, "image mean must be three finite numbers (R, G, B), not 1 values"),
])
def test_open_clip_configs_are_checked_against_the_weights(tmp_path, vision, pre, needle):
    d = train.DEMO_CLIP
    torch.save(clip_loader.CLIP(**d).state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model_cfg = {"embed_dim": d["embed_dim"], "quick_gelu": True,
                 "vision_cfg": {"image_size": d["image_resolution"], "layers": d["vision_layers"],
                                "width": d["vision_width"], "patch_size": d["vision_patch_size"], **vision},
                 "text_cfg": {"context_length": d["context_length"], "width": d["transformer_width"], "heads": 1,
                              "layers": d["transformer_layers"]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}))
    with pytest.raises(clip_loader.CheckpointError) as error:
        clip_loader.load(tmp_path)
    one_line(error.value, clip_loader.CheckpointError, f"{tmp_path}: ", needle)


# --------------------------------------------------------------------------- 6. the shard index


def shard_index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_shard_index_errors_are_one_line_and_echo_no_bytes(hf_folder, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    index = shard_index(hf_folder)
    shards = sorted(set(index["weight_map"].values()))
    name = next(iter(index["weight_map"]))
    secret = tmp_path / "system_file"   # a file outside the folder, as /etc/passwd would be
    secret.write_bytes(b"root:x:0:0:SECRET-CONTENT:/root:/bin/bash\n" * 10)
    cases = {
        "a list as a shard name": ({"weight_map": {**index["weight_map"], name: [shards[0]]}}, {},
                                   "weight_map must map each tensor name to a shard file name"),
        "nested 100000 deep": ("[" * 100_000 + "]" * 100_000, {}, "not a readable JSON config (nested too deep)"),
        "listed, in no shard": ({"weight_map": {**index["weight_map"], "text_model.extra": shards[0]}}, {},
                                "1 tensor(s) the index lists are not in the shard it names, e.g. 'text_model.extra'"),
        "a link to a system file": (index, {shards[0]: secret}, "not a safetensors file"),
    }
    for case, (new_index, links, needle) in cases.items():
        text = new_index if isinstance(new_index, str) else json.dumps(new_index)
        folder = copy_folder(hf_folder, tmp_path / case.replace(" ", "_"), **{"model.safetensors.index.json": text})
        for shard, target in links.items():
            (folder / shard).unlink()
            (folder / shard).symlink_to(target)
        with pytest.raises(clip_loader.CheckpointError) as error:
            clip_loader.load(folder)
        message = one_line(error.value, clip_loader.CheckpointError, needle)
        first_bytes = str(int.from_bytes(secret.read_bytes()[:8], "little"))   # as a header length would show them
        assert "SECRET" not in message and "root:" not in message and first_bytes not in message, message
    # a tensor held by two shards: the first shard's tensor written into the second as well
    folder = copy_folder(hf_folder, tmp_path / "twice")
    first = safetensors_torch.load_file(folder / shards[0])
    second = safetensors_torch.load_file(folder / shards[1])
    (folder / shards[1]).unlink()
    key = next(iter(first))
    safetensors_torch.save_file({**second, key: first[key]}, folder / shards[1])
    with pytest.raises(clip_loader.CheckpointError) as error:
        clip_loader.load(folder)
    one_line(error.value, clip_loader.CheckpointError, f"tensor {key[:40]!r}", "is held by two shards", shards[0], shards[1])


# --------------------------------------------------------------------------- 7. prompts and the context


def test_a_prompt_longer_than_the_context_is_one_line_naming_both_lengths(good, tmp_path):
    long = "a photo of a {} year old person, " + "seen from far away, " * 8
    with pytest.raises(SystemExit) as stop:   # the demo CLIP's context: 32 tokens
        train.main(["--clip", "random", "--prompt-template", long, "--out", str(tmp_path / "run"),
                    "--synthetic-n", "8", "4", "4", "--epochs", "1", "--workers", "0"])
    one_line(stop.value, SystemExit, "--prompt-template with --clip random: the prompt 'a photo of a 100 year old",
             "tokens long, more than the CLIP's context of 32 tokens")
    path = variant(good, tmp_path, lambda c: c["config"]["model"].__setitem__("prompt_template", long))
    refused(path, "config.model.prompt_template: the prompt", "more than the CLIP's context of 32 tokens")
    # zero-shot with a CLIP of a short context (8 tokens)
    clip_path = tmp_path / "short.pt"
    torch.save(clip_loader.CLIP(**{**train.DEMO_CLIP, "context_length": 8}).state_dict(), clip_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "face.png")
    with pytest.raises(SystemExit) as stop:
        ev.main(["--zero-shot", "--clip", str(clip_path), "--clip-activation", "quick_gelu", "--images",
                 str(tmp_path / "face.png"), "--out", str(tmp_path / "out")])
    one_line(stop.value, SystemExit, f"--clip {clip_path}: the prompt", "more than the CLIP's context of 8 tokens")


# --------------------------------------------------------------------------- 8. --face-margin


def test_face_margin_has_a_range(capsys):
    for margin in ("60", "1000", "-0.1", "nan"):
        with pytest.raises(SystemExit):
            ev.parse_args(["--ckpt", "x.pt", "--images", "a.png", "--detect-faces", "--face-margin", margin])
        err = capsys.readouterr().err
        assert "--face-margin" in err and "Traceback" not in err, err
    assert ev.parse_args(["--ckpt", "x.pt", "--face-margin", "1"]).face_margin == 1.0
    image = Image.new("RGB", (100, 100))
    face = data.Face(box=(40, 40, 60, 60), landmarks=((45, 45), (55, 45), (50, 50), (47, 55), (53, 55)),
                     probability=1.0)
    error = bounded(lambda: ev.face_crop(image, face, 32, margin=1000), seconds=1, mib=16)
    one_line(error, ValueError, "face margin 1000 outside [0, 1]")
    assert ev.face_crop(image, face, 32, margin=1).size == (32, 32)   # the largest margin still crops


# --------------------------------------------------------------------------- 9. --images memory

PEAK = r"""
import resource, runpy, sys
sys.argv = ["eval.py", *sys.argv[1:]]
runpy.run_path("eval.py", run_name="__main__")
print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_images_peak_memory_stays_flat_as_the_photos_grow(good, tmp_path):
    """Four photos of 1024 and of 4096 pixels a side (4 and 64 MiB each decoded), predicted by two eval.py
    processes side by side: a batch that held them decoded peaks 240 MiB higher for the larger ones; photos
    read and transformed one at a time, by one photo's."""
    runs = {}
    for side in (1024, 4096):
        folder = tmp_path / str(side)
        folder.mkdir()
        for i in range(4):
            Image.new("RGB", (side, side), (40 * i, 100, 150)).save(folder / f"{i}.png", compress_level=1)
        runs[side] = subprocess.Popen([sys.executable, "-c", PEAK, "--ckpt", str(good[1]), "--images", str(folder),
                                       "--out", str(tmp_path / f"out{side}"), "--device", "cpu"], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks = {}
    for side, run in runs.items():
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr[-2000:]
        assert "4 image(s), 0 unreadable skipped" in stdout
        peaks[side] = int(stdout.split("peak_kib")[-1]) / 1024
    assert peaks[4096] - peaks[1024] < 100, peaks


# --------------------------------------------------------------------------- 10. predict_images' guards


def test_predict_images_applies_the_datasets_size_guards(good):
    model, _ = ev.load_model(good[1])
    strip = Image.new("L", (300_000, 1))
    error = bounded(lambda: ev.predict_images(model, [Image.new("RGB", (40, 40)), strip]), seconds=1, mib=32)
    one_line(error, ValueError, "image 1 of the 2 given: 300000x1 pixels: aspect ratio beyond 16:1")
    wide = Image.new("1", (20000, 15000))   # 36 MiB as a bitmap, 1.1 GiB as the RGB the transform would make
    error = bounded(lambda: ev.predict_images(model, wide), seconds=1, mib=32)
    one_line(error, ValueError, "image 0 of the 1 given: 20000x15000 pixels: more than the 268,435,456")
