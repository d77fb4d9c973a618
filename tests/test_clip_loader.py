"""clip_loader against OpenAI's own code (clip-anytorch: clip.model, clip.simple_tokenizer, clip.clip).

Every fixture is made here, in tmp_path: random weights in the official layout from the reference
CLIP class, written as state-dict files, TorchScript archives, safetensors (by hand), fp16 copies.
"""
import hashlib
import html
import json
import os
import pickle
import random
import struct
import warnings
import zipfile

import ftfy
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
    import clip
    import clip.clip
    import clip.model
    import clip.simple_tokenizer

import clip_loader as cl

# torch.jit.trace/save deprecation notices and the reference's trace-time notices, in this file only
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

SMALL = {
    # vision heads = width // 64 (ViT) or 32 * width // 64 (ResNet), text heads = width // 64: the
    # conventions build_model infers, like OpenAI's
    "vit": dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                context_length=16, vocab_size=49408, transformer_width=128, transformer_heads=2,
                transformer_layers=2),
    "resnet": dict(embed_dim=64, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16,
                   vision_patch_size=None, context_length=16, vocab_size=49408, transformer_width=128,
                   transformer_heads=2, transformer_layers=2),
}
VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)
PROMPTS = ["a photo of a 37 year old person.", "a face", "an old man with grey hair, smiling"]


def reference_model(config, seed=0):
    """OpenAI's CLIP class, float32 (its build_model would convert to fp16, so construct it directly)."""
    torch.manual_seed(seed)
    model = clip.model.CLIP(**config).eval()
    if isinstance(config["vision_layers"], tuple):  # give BatchNorm non-trivial statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
    return model


def inputs(config, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = config["image_resolution"]
    return torch.randn(batch, 3, r, r, generator=g), clip.tokenize(PROMPTS, context_length=config["context_length"])


def reference_outputs(ref, config):
    image, text = inputs(config)
    with torch.no_grad():
        return ref.encode_image(image), ref.encode_text(text)


def assert_same_outputs(ours, ref, config, expected=None):
    """encode_image and encode_text agree with the reference to 1e-5 (float32), and so do the logits."""
    image, text = inputs(config)
    image_ref, text_ref = expected or reference_outputs(ref, config)
    with torch.no_grad():
        image_ours, text_ours = ours.encode_image(image), ours.encode_text(text)
    torch.testing.assert_close(image_ours, image_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_ours, text_ref, atol=1e-5, rtol=1e-5)
    logits = ref.logit_scale.exp() * F.normalize(image_ref, dim=-1) @ F.normalize(text_ref, dim=-1).t()
    with torch.no_grad():
        torch.testing.assert_close(ours.logit_scale.exp() * F.normalize(image_ours, dim=-1)
                                   @ F.normalize(text_ours, dim=-1).t(), logits, atol=1e-4, rtol=1e-5)
    if expected is None:  # small models: forward too
        with torch.no_grad():
            torch.testing.assert_close(ours(image, text)[0], ref(image, text)[0], atol=1e-4, rtol=1e-5)


def write_safetensors(path, state_dict):
    """The format by hand: 8-byte little-endian header length, JSON header, raw bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, t in state_dict.items():
        t = t.detach().contiguous()
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_torchscript(path, model, config):
    """A traced archive, as OpenAI's files are. Tracing encode_text alone keeps it quick: the archive
    holds the whole module tree (image tower included) either way."""
    _, text = inputs(config)
    with torch.no_grad():
        traced = torch.jit.trace_module(model, {"encode_text": text[:1]}, check_trace=False)
    torch.jit.save(traced, str(path))


@pytest.fixture(scope="module", params=sorted(SMALL))
def small(request):
    return request.param, SMALL[request.param], reference_model(SMALL[request.param])


@pytest.mark.parametrize("form", ["state_dict", "nested", "module_prefix", "open_clip_bin", "safetensors",
                                  "torchscript"])
def test_load_every_file_form_matches_reference(small, form, tmp_path):
    name, config, ref = small
    sd = ref.state_dict()
    path = tmp_path / f"{name}.pt"
    if form == "state_dict":
        torch.save(sd, path)
    elif form == "nested":
        torch.save({"epoch": 3, "state_dict": sd}, path)
    elif form == "module_prefix":
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    elif form == "open_clip_bin":
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(sd, path)
    elif form == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        write_safetensors(path, sd)
    else:
        write_torchscript(path, ref, config)
        assert "constants.pkl" in " ".join(zipfile.ZipFile(path).namelist())
    model, preprocess = cl.load(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.visual.input_resolution == config["image_resolution"] and not model.training
    assert model.embed_dim == config["embed_dim"] and model.context_length == config["context_length"]
    assert_same_outputs(model, ref, config)
    # the preprocess returned is OpenAI's transform at the model's resolution
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert torch.equal(preprocess(image), clip.clip._transform(config["image_resolution"])(image))


def test_vit_b16_shaped_model_from_state_dict_and_archive(tmp_path):
    ref = reference_model(VIT_B16)
    torch.save(ref.state_dict(), tmp_path / "b16.pt")
    write_torchscript(tmp_path / "b16_jit.pt", ref, VIT_B16)
    expected = reference_outputs(ref, VIT_B16)
    for path in (tmp_path / "b16.pt", tmp_path / "b16_jit.pt"):
        model, _ = cl.load(path)
        assert cl.infer_config(model.state_dict()) == cl.CLIPConfig(**VIT_B16)
        assert_same_outputs(model, ref, VIT_B16, expected)
        del model


def test_fp16_and_bf16_checkpoints_load_as_float32(tmp_path):
    config = SMALL["vit"]
    ref = reference_model(config)
    clip.model.convert_weights(ref)  # OpenAI's own fp16 conversion, as in its released files
    torch.save(ref.state_dict(), tmp_path / "fp16.pt")
    assert ref.visual.proj.dtype == torch.float16
    bf16 = {k: v.float().bfloat16() for k, v in ref.state_dict().items()}
    write_safetensors(tmp_path / "bf16.safetensors", bf16)
    for path, stored in ((tmp_path / "fp16.pt", ref.state_dict()), (tmp_path / "bf16.safetensors", bf16)):
        model, _ = cl.load(path)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        for key, value in stored.items():  # every weight is the file's value, widened exactly
            assert torch.equal(model.state_dict()[key], value.float()), key
    ref.float()  # the fp16-rounded weights in float32: our model computes the same function
    assert_same_outputs(cl.load(tmp_path / "fp16.pt")[0], ref, config)


def test_archive_reader_ignores_non_weights_and_jit_fallback_is_opt_in(tmp_path, monkeypatch):
    config = SMALL["vit"]
    ref = reference_model(config)
    sd = dict(ref.state_dict())
    # what OpenAI's archives and older code carry besides weights: metadata scalars, cached masks
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    sd["transformer.resblocks.0.attn_mask"] = torch.full((16, 16), float("-inf")).triu(1)
    assert_same_outputs(cl.build_model(sd), ref, config)

    path = tmp_path / "archive.pt"
    write_torchscript(path, ref, config)

    def unreadable(p):
        raise cl._ArchiveError("simulated unknown archive layout")

    monkeypatch.setattr(cl, "_read_torchscript", unreadable)
    with pytest.raises(ValueError, match="trust_torchscript=True") as err:
        cl.load(path)
    assert str(path) in str(err.value)
    assert_same_outputs(cl.load(path, trust_torchscript=True)[0], ref, config)


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCommand(marker)
    # (1) a torch.save file whose pickle calls os.system
    torch.save({"visual.proj": payload}, tmp_path / "evil.pt")
    # (2) a TorchScript-shaped archive whose data.pkl calls os.system
    with zipfile.ZipFile(tmp_path / "evil_jit.pt", "w") as z:
        z.writestr("evil_jit/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("evil_jit/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil_jit/version", "3\n")
    # (3) a legacy (non-zip) pickle
    with open(tmp_path / "evil_legacy.pt", "wb") as f:
        pickle.dump(payload, f, protocol=2)
    for name in ("evil.pt", "evil_jit.pt", "evil_legacy.pt"):
        with pytest.raises(ValueError, match="evil") as err:
            cl.load(tmp_path / name)
        assert "system" in str(err.value), str(err.value)
        assert not marker.exists()
    with pytest.raises(ValueError, match="trust_torchscript"):
        cl.load(tmp_path / "evil_jit.pt")


def test_not_a_clip_checkpoint_gets_a_clear_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"resnet\.pt: not a CLIP state dict.*visual\.proj"):
        cl.load(tmp_path / "resnet.pt")
    sd = reference_model(SMALL["vit"]).state_dict()
    sd["visual.ln_post.weight"] = torch.zeros(99)  # one wrong shape: named, expected vs got
    with pytest.raises(ValueError, match=r"visual\.ln_post\.weight: expected shape \(128,\).*got \(99,\)"):
        cl.build_model(sd)
    del sd["visual.ln_post.weight"]
    with pytest.raises(ValueError, match=r"missing \['visual\.ln_post\.weight'\]"):
        cl.build_model(sd)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        cl.load(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        cl.load(tmp_path / "absent.pt")


def test_official_names_are_sha256_verified(tmp_path, monkeypatch):
    # the table is the one in OpenAI's download addresses
    for url in clip.clip._MODELS.values():
        assert cl.OPENAI_SHA256[url.split("/")[-1]] == url.split("/")[-2]
    assert len(cl.OPENAI_SHA256) == len(clip.clip._MODELS)
    config = SMALL["vit"]
    ref = reference_model(config)
    path = tmp_path / "ViT-B-32.pt"  # an official name, but not OpenAI's file: must be refused
    torch.save(ref.state_dict(), path)
    with pytest.raises(ValueError, match=r"ViT-B-32\.pt.*does not match.*truncated or corrupted") as err:
        cl.load(path)
    assert cl.OPENAI_SHA256["ViT-B-32.pt"] in str(err.value) and "verify=False" in str(err.value)
    assert "https://openaipublic.azureedge.net/clip/models/40d36571" in str(err.value)
    assert_same_outputs(cl.load(path, verify=False)[0], ref, config)
    # with the table holding this file's digest, the check passes (and a one-byte change fails it)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(cl.OPENAI_SHA256, "ViT-B-32.pt", digest)
    assert cl.verify_checkpoint(str(path)) is True
    assert_same_outputs(cl.load(path)[0], ref, config)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(ValueError, match="does not match"):
        cl.verify_checkpoint(str(path))
    assert cl.verify_checkpoint(str(tmp_path / "my_model.pt")) is False  # unofficial names: no check


def _ref_vit_tokens(ref, image):
    """Patch tokens by hand from the reference modules: the ViT forward, ln_post + proj on every token."""
    v = ref.visual
    x = v.conv1(image).flatten(2).permute(0, 2, 1)
    cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding)
    x = v.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    return v.ln_post(x[:, 1:]) @ v.proj


def _ref_resnet_tokens(ref, image):
    """Last-stage cells (+ positional embedding, as the pool sees them) through v_proj then c_proj."""
    v = ref.visual
    x = v.relu1(v.bn1(v.conv1(image)))
    x = v.relu2(v.bn2(v.conv2(x)))
    x = v.avgpool(v.relu3(v.bn3(v.conv3(x))))
    x = v.layer4(v.layer3(v.layer2(v.layer1(x))))
    cells = x.flatten(2).permute(0, 2, 1) + v.attnpool.positional_embedding[1:]
    return v.attnpool.c_proj(v.attnpool.v_proj(cells))


def test_encode_image_tokens_match_hand_computation(small):
    name, config, ref = small
    model = cl.build_model(ref.state_dict())
    image, _ = inputs(config)
    with torch.no_grad():
        g, tokens, grid = model.encode_image_tokens(image)
        assert torch.equal(g, model.encode_image(image))
        expected = _ref_vit_tokens(ref, image) if name == "vit" else _ref_resnet_tokens(ref, image)
        side = config["image_resolution"] // (8 if name == "vit" else 32)
        assert grid == (side, side) and tokens.shape == (2, side * side, config["embed_dim"])
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_gradient_checkpointing_keeps_gradients_and_batchnorm_statistics(name):
    """set_grad_checkpointing: in training mode the same gradients and (ResNet) the same BatchNorm running
    statistics as without it, while the blocks' activations are no longer saved for backward."""
    config = SMALL[name]
    image, text = inputs(config)
    runs = []
    for on in (False, True):
        torch.manual_seed(0)
        model = cl.CLIP(**config).train()
        model.set_grad_checkpointing(on)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logits, _ = model(image, text)
        (logits ** 2).mean().backward()
        runs.append((sum(saved), {k: p.grad for k, p in model.named_parameters()},
                     {k: b.clone() for k, b in model.named_buffers()}))
    (kept_off, grads_off, buffers_off), (kept_on, grads_on, buffers_on) = runs
    assert kept_on < kept_off / 2
    for k, grad in grads_off.items():
        assert torch.equal(grad, grads_on[k]), k
    assert buffers_off.keys() == buffers_on.keys()
    for k, buffer in buffers_off.items():
        assert torch.equal(buffer, buffers_on[k]), k


def test_other_input_resolution_resamples_positional_embeddings(small):
    """At a new grid the model equals the reference whose positional embedding was resized by hand
    (bicubic, antialiased, as open_clip) to that grid."""
    name, config, ref = small
    model = cl.build_model(ref.state_dict())
    stride = 8 if name == "vit" else 32
    h, w = 3, 5
    image = torch.randn(2, 3, h * stride, w * stride)
    owner = ref.visual if name == "vit" else ref.visual.attnpool
    pos = owner.positional_embedding.detach()
    s = int(round((pos.shape[0] - 1) ** 0.5))
    cells = F.interpolate(pos[1:].reshape(1, s, s, -1).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                          antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(h * w, -1)
    resized = reference_model(config)
    resized.load_state_dict(ref.state_dict())
    target = resized.visual if name == "vit" else resized.visual.attnpool
    target.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], cells]))
    with torch.no_grad():
        g, tokens, grid = model.encode_image_tokens(image)
        assert grid == (h, w) and tokens.shape == (2, h * w, config["embed_dim"])
        torch.testing.assert_close(g, resized.encode_image(image), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Tokenizer

def _generated_texts(n, seed=0):
    rng = random.Random(seed)
    pools = [
        "a photo of a {} year old person.", "face", "Ｆｕｌｌｗｉｄｔｈ", "Ünïcödé naïve café", "日本語のテキスト",
        "中文字符", "한국어", "русский текст", "ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย", "😀🎉👍🏽👨‍👩‍👧",
        "&amp;", "&lt;b&gt;", "&amp;amp;", "&#39;", "&quot;hi&quot;", "&nbsp;", "don't", "it's", "WE'LL", "I'd",
        "they've", "!!!", "?!?!", "...", "---", "$$$", "@#%^*", "(((", "12345", "3.14", "1e10", "０１２",
        "\t", "\n", "\r\n", "  ", "\u00a0", "\u2028", "\u3000", "ﬁne", "â€™", "Ã©", "\x1b[31m", "\u200b",
        "<|startoftext|>", "<|endoftext|>", "<b>bold</b>", "http://x.org/a?b=c&d=e", "C:\\path\\file",
        "snake_case", "CamelCase", "ÀÉÎÕÜ", "ß", "İ", "ǅ", "x" * 30,
    ]
    texts, seen, attempt = [], set(), 0
    while len(texts) < n:
        attempt += 1
        k = rng.randint(1, 12)
        parts = [rng.choice(pools).format(rng.randint(0, 100)) for _ in range(k)]
        seps = [rng.choice([" ", "", "  ", "\t", ", ", "\n"]) for _ in parts]
        text = "".join(p + s for p, s in zip(parts, seps))
        if attempt % 10 == 0:
            text = f"a photo of a {rng.randint(0, 100)} year old {rng.choice(['man', 'woman', 'child', 'person'])}."
        if text not in seen:
            seen.add(text)
            texts.append(text)
    texts += [" ".join(["face"] * 80), "😀" * 40, "a" * 500]  # over-long texts
    return texts


def test_tokenizer_ids_identical_to_reference_on_10k_texts():
    texts = _generated_texts(10_000)
    assert len(set(texts)) == len(texts) > 10_000
    ref = clip.simple_tokenizer.SimpleTokenizer()
    ours = cl.SimpleTokenizer()
    assert ours.encoder == ref.encoder and ours.bpe_ranks == ref.bpe_ranks
    mismatches = [t for t in texts if ours.encode(t) != ref.encode(t)]
    assert not mismatches, mismatches[:5]
    # tokenize: both error paths and the truncate path, row by row
    short = [t for t in texts if len(ref.encode(t)) <= 75]
    long = [t for t in texts if len(ref.encode(t)) > 75]
    assert len(long) >= 10 and len(short) > 8_000
    assert torch.equal(cl.tokenize(short[:2000]), clip.tokenize(short[:2000]))
    sample = short[-1000:] + long
    assert torch.equal(cl.tokenize(sample, truncate=True), clip.tokenize(sample, truncate=True))
    assert torch.equal(cl.tokenize(long, context_length=300, truncate=True), clip.tokenize(long, context_length=300, truncate=True))
    for text in long[:5]:
        with pytest.raises(RuntimeError):
            clip.tokenize(text)
        with pytest.raises(RuntimeError, match="truncate=True"):
            cl.tokenize(text)
    truncated = cl.tokenize(long, truncate=True)
    assert (truncated[:, -1] == ours.eot_token).all()


def test_decode_round_trip():
    ours, ref = cl.SimpleTokenizer(), clip.simple_tokenizer.SimpleTokenizer()
    for text in _generated_texts(500, seed=3):
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
    text = "a photo of an old woman smiling"
    assert ours.decode(ours.encode(text)) == "".join(w + " " for w in text.split())
    assert ours.decode(ours.encode("Crème BRÛLÉE 😀")).split() == ["crème", "brûlée", "😀"]


def test_plain_ascii_shortcut_matches_ftfy():
    """The tokenizer skips ftfy/html for printable ASCII without '&': check that they change nothing."""
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert cl._PLAIN.fullmatch(text)
        assert ftfy.fix_text(text) == text and html.unescape(text) == text
    for text in ("a &amp; b", "caf\u00e9", "x\ry", "\x1b[0m"):
        assert not cl._PLAIN.fullmatch(text)


def test_default_bpe_is_found():
    path = cl.default_bpe()
    assert os.path.isfile(path) and path.endswith("bpe_simple_vocab_16e6.txt.gz")
    assert cl.SimpleTokenizer(path).encode("hello world") == [3306, 1002]


# ---------------------------------------------------------------------------------------------
# Preprocessing

def _image(mode, size, seed):
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "PA", "RGBA", "CMYK", "1", "YCbCr"])
def test_preprocess_identical_to_reference(mode):
    for i, (size, n_px) in enumerate([((300, 200), 224), ((57, 91), 64), ((224, 224), 224), ((640, 17), 32)]):
        image = _image(mode, size, i)
        ours = cl.image_transform(n_px)(image)
        assert ours.shape == (3, n_px, n_px)
        assert torch.equal(ours, clip.clip._transform(n_px)(image))


def test_to_rgb_scales_wide_modes_instead_of_clipping():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode == "I;16"
    assert np.array(cl.to_rgb(img16))[0, :, 0].tolist() == [0, 100, 255]
    assert np.array(img16.convert("RGB"))[0, :, 0].tolist() == [0, 255, 255]  # OpenAI's convert clips
    big_endian = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    assert np.array(cl.to_rgb(big_endian))[0, :, 0].tolist() == [0, 100, 255]
    as_int = lambda a: Image.fromarray(np.array(a, dtype=np.int32))
    assert np.array(cl.to_rgb(as_int([[0, 17, 255]])))[0, :, 1].tolist() == [0, 17, 255]  # 8-bit data kept
    assert np.array(cl.to_rgb(as_int([[0, 25700, 65535]])))[0, :, 1].tolist() == [0, 100, 255]
    assert np.array(cl.to_rgb(as_int([[-10, 0, 10]])))[0, :, 2].tolist() == [0, 128, 255]  # stretched
    as_float = lambda a: Image.fromarray(np.array(a, dtype=np.float32))
    assert np.array(cl.to_rgb(as_float([[0.0, 0.5, 1.0]])))[0, :, 0].tolist() == [0, 128, 255]
    assert np.array(cl.to_rgb(as_float([[2.0, 2.0]])))[0, :, 0].tolist() == [2, 2]
    for mode in ("La", "RGBa", "HSV", "LAB", "I;16", "F"):
        image = _image("RGBA" if mode in ("La", "RGBa") else "RGB", (40, 30), 0)
        image = image.convert(mode) if mode not in ("I;16", "F") else image.convert("L").convert(mode)
        out = cl.image_transform(16)(image)
        assert out.shape == (3, 16, 16) and torch.isfinite(out).all()
