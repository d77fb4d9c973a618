"""Tests of the demo CLIP: its caption corpus (data.py), CLIP's pretraining loss, and the file that
`train.py --objective clip` writes and the demo reads through clip_loader.load."""
import json
import math

import numpy as np
import pytest
import torch

import clip_loader
import data
import train


# ---- the caption corpus ------------------------------------------------------------------------

def test_captions_state_the_age_and_what_the_drawing_shows():
    corpus = data.CaptionedDrawings(300, seed=0, transform=None, image_size=37, context_length=32)
    tokenizer = clip_loader._default_tokenizer()
    forms = {"number": 0, "decade": 0, "stage": 0}
    for i in range(len(corpus)):
        image, text, age = corpus.pair(i)
        assert image.size == (37, 37) and 0 <= age <= 100
        assert len(tokenizer.encode(text)) + 2 <= 32, text
        rng = np.random.default_rng([0, data.CaptionedDrawings.CODE, i])
        rng.integers(0, 101)
        shown = data.draw_synthetic(age, rng, 37)[1]
        if "hair" in text:
            assert f"with {shown['hair']} hair" in text
        if "background" in text:
            assert f"{shown['background']} background" in text
        if str(age) in text.split(",")[0].replace("-", " ").split():
            forms["number"] += 1
        elif any(d in text for d in ("teens", "ties")):
            forms["decade"] += 1
        else:
            forms["stage"] += 1
    assert all(n > 30 for n in forms.values()), forms


def test_caption_age_rate_leaves_the_age_out_of_the_other_captions():
    """--caption-age-rate r: about r of the captions state the age, the rest say "a photo of a person"
    with the same details; each stated caption is the one the full corpus has (same drawing, same words)."""
    full = data.CaptionedDrawings(400, seed=0, transform=None, image_size=37, context_length=32)
    rare = data.CaptionedDrawings(400, seed=0, transform=None, image_size=37, context_length=32, age_rate=0.25)
    stated = 0
    for i in range(len(full)):
        (image, text, age), (rare_image, rare_text, rare_age) = full.pair(i), rare.pair(i)
        assert (np.asarray(image) == np.asarray(rare_image)).all() and age == rare_age
        if rare_text == text:
            stated += 1
        else:   # the same details after the generic phrase (an age phrase may hold a comma itself)
            generic = "a photo of a person"
            assert rare_text.startswith(generic) and text.endswith(rare_text[len(generic):]), (text, rare_text)
    assert 0.19 < stated / len(full) < 0.31, stated


def test_corpus_drawings_are_not_the_demo_splits():
    corpus = data.CaptionedDrawings(50, seed=0, transform=None, image_size=37, context_length=32)
    demo = data.build_dataset("synthetic", split="all", seed=0, n=50, image_size=37)
    demo_images = {np.asarray(demo.image(i)).tobytes() for i in range(len(demo))}
    assert not any(np.asarray(corpus.pair(i)[0]).tobytes() in demo_images for i in range(len(corpus)))


def test_age_words_follow_the_age():
    rng = np.random.default_rng(0)
    phrases = {age: {data.age_phrase(age, rng) for _ in range(200)} for age in (2, 44, 80)}
    assert "a toddler" in phrases[2]
    assert {"a woman in her forties", "a man in his mid forties"} <= phrases[44]
    assert "an elderly man" in phrases[80] and not any("toddler" in p for p in phrases[80])
    assert data.colour_name((0.1, 0.2, 0.85)) == "blue"


# ---- CLIP's loss -------------------------------------------------------------------------------

def test_clip_loss_is_the_hand_computed_symmetric_infonce():
    image = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    scale = 10.0
    # cosine similarities by hand: image rows normalised (0.6, 0.8), (1, 0), (0, -1); text (1,0), (0,1), -(1,1)/sqrt2
    r = 1 / math.sqrt(2)
    cos = [[0.6, 0.8, -1.4 * r], [1.0, 0.0, -r], [0.0, -1.0, r]]
    def ce(row, k):   # -log softmax(scale * row)[k]
        return -(scale * row[k] - math.log(sum(math.exp(scale * c) for c in row)))
    image_to_text = sum(ce(cos[i], i) for i in range(3)) / 3
    text_to_image = sum(ce([cos[j][i] for j in range(3)], i) for i in range(3)) / 3
    want = (image_to_text + text_to_image) / 2
    got = train.clip_loss(image, text, torch.tensor(math.log(scale)))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_clip_loss_trains_the_temperature():
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    train.clip_loss(torch.eye(4), torch.eye(4) + 0.1, scale).backward()
    assert scale.grad is not None and scale.grad.item() < 0   # matching pairs: a sharper softmax helps


# ---- the demo CLIP file ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_demo_clip(tmp_path_factory):
    """A demo CLIP pretrained for a few steps: the real architecture and file, a tiny corpus."""
    out = tmp_path_factory.mktemp("demo_clip")
    record = train.main(["--objective", "clip", "--corpus-size", "96", "--epochs", "2", "--batch-size", "32",
                         "--workers", "0", "--device", "cpu", "--out", str(out)])
    return out / "demo_clip.pt", record


def test_demo_clip_file_loads_like_an_openai_file_and_its_sha256_is_checked(tiny_demo_clip, monkeypatch):
    path, record = tiny_demo_clip
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["sha256"] == record["sha256"] == clip_loader.sha256(path)
    assert len(saved["history"]) == 2 and all(math.isfinite(h["loss"]) for h in saved["history"])
    model, preprocess = clip_loader.load(str(path))
    assert model.embed_dim == train.DEMO_CLIP["embed_dim"]
    assert model.context_length == train.DEMO_CLIP["context_length"]
    assert model.vocab_size == 49408 and model.logit_scale.exp().item() <= 100.0 + 1e-3
    monkeypatch.setattr(train, "DEMO_CLIP_FILE", path)
    monkeypatch.setattr(train, "demo_clip_options", lambda: saved["options"])   # built small, on purpose
    assert train.demo_clip() == path
    copy = path.with_name("tampered.pt")
    copy.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    copy.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    monkeypatch.setattr(train, "DEMO_CLIP_FILE", copy)
    with pytest.raises(SystemExit, match="SHA-256"):
        train.demo_clip()


def test_a_demo_clip_built_with_other_options_is_refused_by_name(tiny_demo_clip, monkeypatch, tmp_path):
    """A cache from an older version (captions all stating the age, no caption_age_rate recorded) or
    built by hand with other options would give other figures than the README's: the demo names them."""
    path, _ = tiny_demo_clip
    monkeypatch.setattr(train, "DEMO_CLIP_FILE", path)
    with pytest.raises(SystemExit, match=r"corpus_size 96 \(default 30000\).*epochs 2 \(default 5\)"):
        train.demo_clip()
    old = tmp_path / "demo_clip.pt"
    old.write_bytes(path.read_bytes())
    record = json.loads(path.with_suffix(".json").read_text())
    record["options"] = {k: v for k, v in train.demo_clip_options().items() if k != "caption_age_rate"}
    old.with_suffix(".json").write_text(json.dumps(record))
    monkeypatch.setattr(train, "DEMO_CLIP_FILE", old)
    with pytest.raises(SystemExit, match=r"other options than the demo's: caption_age_rate 1.0 \(default 0.25\); "
                                         r"delete"):
        train.demo_clip()


def test_demo_run_names_the_demo_clip_in_its_config(tiny_demo_clip, monkeypatch, tmp_path):
    path, record = tiny_demo_clip
    monkeypatch.setattr(train, "DEMO_CLIP_FILE", path)
    monkeypatch.setattr(train, "demo_clip_options", lambda: record["options"])   # built small, on purpose
    train.main(["--synthetic-n", "64", "32", "32", "--depth", "1", "--epochs", "1", "--workers", "0",
                "--device", "cpu", "--out", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["clip"]["source"] == str(path) and config["clip"]["sha256"] == record["sha256"]
    assert config["model"]["freeze_text_tower"] and config["train"]["clip_lr"] == train.DEMO_CLIP_LR
