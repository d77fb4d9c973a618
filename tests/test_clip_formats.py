"""clip_loader against the libraries that write the CLIP files researchers have: Hugging Face
transformers (CLIPModel.save_pretrained) and open_clip (create_model, its open_clip_config.json).

Each test builds a tiny random model with the library itself, saves it as the library does, loads it
with clip_loader.load and compares encode_image / encode_text with the library's own to 1e-5:
both activations, head widths other than 64, MLP ratios other than 4, a non-square image size
(open_clip allows one), both of Hugging Face's text pooling rules. Then the refusals (families this
CLIP cannot run) and the warning for a file whose architecture nothing states.
"""
import json
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import clip_loader as cl

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
from open_clip.push_to_hf_hub import save_config_for_hf  # noqa: E402  (after the importorskip)

PROMPTS = ["a photo of a 37 year old person.", "a face", "an old man with grey hair, smiling"]


def text_ids(context_length):
    """Our tokenizer's ids, plus a row with no end-of-text token: there the two pooling rules differ
    (the highest id vs the first eos_token_id, which Hugging Face reads as position 0 when absent)."""
    ids = cl.tokenize(PROMPTS, context_length=context_length)
    no_eos = torch.zeros(1, context_length, dtype=torch.long)
    no_eos[0, :4] = torch.tensor([49406, 320, 1125, 539])
    return torch.cat([ids, no_eos])


def assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Hugging Face

def hf_model(activation="quick_gelu", heads=(2, 4), eos_token_id=49407, eps=1e-5, seed=0):
    """A tiny random transformers.CLIPModel: width 64, 2 layers per tower, MLPs of 96 (ratio 1.5).
    eps: both towers' layer-norm eps, or (vision, text)."""
    torch.manual_seed(seed)
    vision_eps, text_eps = eps if isinstance(eps, tuple) else (eps, eps)
    tower = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, hidden_act=activation)
    config = transformers.CLIPConfig(
        vision_config=dict(tower, num_attention_heads=heads[0], image_size=32, patch_size=8, layer_norm_eps=vision_eps),
        text_config=dict(tower, num_attention_heads=heads[1], max_position_embeddings=16, eos_token_id=eos_token_id,
                         layer_norm_eps=text_eps),
        projection_dim=48)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): randomise them so a dropped or swapped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_features(model, image, ids):
    with torch.no_grad():
        return (model.get_image_features(pixel_values=image).pooler_output,
                model.get_text_features(input_ids=ids).pooler_output)


@pytest.mark.parametrize("activation, heads, eos, eps", [
    ("quick_gelu", (1, 1), 2, 1e-5),       # heads of 64; the pre-#24773 config: pooled at the highest id
    ("gelu", (2, 4), 49407, 1e-6),         # heads of 32 and 16, pooled at the first eos_token_id
])
def test_hugging_face_folder_and_files_match_transformers(tmp_path, activation, heads, eos, eps):
    model = hf_model(activation, heads, eos, eps)
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the older file name, beside the same config
    image, ids = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), text_ids(16)
    image_ref, text_ref = hf_features(model, image, ids)
    for path in (tmp_path, tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a config is beside it: nothing is assumed, nothing to warn about
            ours, _ = cl.load(path)
        assert ours.config.activation == activation and ours.config.text_eos_id == (None if eos == 2 else eos)
        with torch.no_grad():
            assert_close(ours.encode_image(image), image_ref)
            assert_close(ours.encode_text(ids), text_ref)
        assert torch.equal(ours.logit_scale, model.logit_scale)


def test_hugging_face_sharded_folder_and_its_image_processor(tmp_path):
    model = hf_model()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    image, ids = torch.randn(1, 3, 32, 32), text_ids(16)
    image_ref, text_ref = hf_features(model, image, ids)
    # the normalisation its image processor states (as transformers' CLIPImageProcessor writes it)
    transformers.CLIPImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]).save_pretrained(tmp_path)
    ours, _ = cl.load(tmp_path)
    assert (ours.image_mean, ours.image_std) == ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    with torch.no_grad():
        assert_close(ours.encode_image(image), image_ref)
        assert_close(ours.encode_text(ids), text_ref)


def test_hugging_face_without_config_or_with_another_vocabulary_is_refused(tmp_path):
    model = hf_model()
    safetensors.torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="config.json"):
        cl.load(tmp_path / "model.safetensors")
    config = model.config.to_dict()
    config["text_config"]["bos_token_id"] = 0  # a tokenizer whose ids are not OpenAI's
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="BPE tokenizer cannot serve it"):
        cl.load(tmp_path)


def test_hugging_face_siglip_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64)
    config = transformers.SiglipConfig(vision_config=dict(tower, image_size=32, patch_size=8),
                                       text_config=dict(tower, vocab_size=100, max_position_embeddings=8))
    transformers.SiglipModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="SigLIP"):
        cl.load(tmp_path)


# ----------------------------------------------------------------------------------------------
# open_clip

OPEN_CLIP_TINY = {
    # GELU (as every laion2b/datacomp tag), heads of 32 (image) and 16 (text), MLP ratio 3, a
    # non-square image, a normalisation of its own
    "gelu_wide": dict(model_cfg=dict(embed_dim=48, quick_gelu=False,
                                     vision_cfg=dict(image_size=[32, 48], layers=2, width=64, head_width=32,
                                                     mlp_ratio=3.0, patch_size=8),
                                     text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=4,
                                                   layers=2, mlp_ratio=3.0)),
                      mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
    # QuickGELU (openai, metaclip, dfn tags), OpenAI's head width
    "quickgelu": dict(model_cfg=dict(embed_dim=48, quick_gelu=True,
                                     vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
                                     text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=1, layers=2))),
    # a ModifiedResNet image tower (open_clip's RN50 with GELU text), heads of 128 in its pool
    "resnet_gelu": dict(model_cfg=dict(embed_dim=48,
                                       vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16, head_width=128),
                                       text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=1))),
}


def open_clip_model(tmp_path, kind, seed=0):
    """open_clip.create_model on a registered tiny config; randomised norms (BatchNorm statistics too)."""
    spec = OPEN_CLIP_TINY[kind]
    name = f"i14tiny-{kind}"
    config_file = tmp_path / f"{name}.json"
    config_file.write_text(json.dumps(spec["model_cfg"]))
    open_clip.add_model_config(config_file)
    torch.manual_seed(seed)
    preprocess_cfg = {"mean": spec["mean"], "std": spec["std"]} if "mean" in spec else None
    model = open_clip.create_model(name, pretrained=None, force_preprocess_cfg=preprocess_cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval(), spec["model_cfg"]


def open_clip_inputs(model):
    size = model.visual.image_size if hasattr(model.visual, "image_size") else (64, 64)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)), text_ids(16)[:3]


def open_clip_features(model, image, ids):
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(ids)


def save_open_clip(model, model_cfg, folder, config=True):
    """As open_clip's save_for_hf: both weight files and open_clip_config.json (model_cfg + preprocess_cfg)."""
    folder.mkdir(exist_ok=True)
    safetensors.torch.save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    if config:
        save_config_for_hf(model, folder / "open_clip_config.json", model_config=model_cfg)


@pytest.mark.parametrize("kind", sorted(OPEN_CLIP_TINY))
def test_open_clip_with_its_config_matches_open_clip(tmp_path, kind):
    model, model_cfg = open_clip_model(tmp_path, kind)
    save_open_clip(model, model_cfg, tmp_path / "model")
    image, ids = open_clip_inputs(model)
    image_ref, text_ref = open_clip_features(model, image, ids)
    for path in (tmp_path / "model", tmp_path / "model" / "open_clip_model.safetensors",
                 tmp_path / "model" / "open_clip_pytorch_model.bin"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours, preprocess = cl.load(path)
        with torch.no_grad():
            assert_close(ours.encode_image(image), image_ref)
            assert_close(ours.encode_text(ids), text_ref)
    # the GELU / QuickGELU choice is what makes them equal: the other one is measurably wrong
    wrong, _ = cl.load(tmp_path / "model", activation="quick_gelu" if ours.config.activation == "gelu" else "gelu")
    with torch.no_grad():
        assert (wrong.encode_text(ids) - text_ref).abs().max() > 1e-3


def test_open_clip_preprocess_uses_its_mean_and_std(tmp_path):
    model, model_cfg = open_clip_model(tmp_path, "quickgelu")
    model.visual.image_mean, model.visual.image_std = (0.5, 0.5, 0.5), (0.25, 0.3, 0.35)
    save_open_clip(model, model_cfg, tmp_path / "model")
    _, preprocess = cl.load(tmp_path / "model")
    reference = open_clip.image_transform(32, is_train=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.3, 0.35))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert torch.equal(preprocess(image), reference(image))


def test_explicit_arguments_win_over_the_config_and_replace_it(tmp_path):
    # without a config: a GELU ResNet CLIP with heads of 128 (pool) and 32 (text), described by arguments
    model, model_cfg = open_clip_model(tmp_path, "resnet_gelu")
    save_open_clip(model, model_cfg, tmp_path / "bare", config=False)
    image, ids = open_clip_inputs(model)
    image_ref, text_ref = open_clip_features(model, image, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours, _ = cl.load(tmp_path / "bare" / "open_clip_pytorch_model.bin", activation="gelu",
                          vision_head_width=128, text_head_width=32)
    with torch.no_grad():
        assert_close(ours.encode_image(image), image_ref)
        assert_close(ours.encode_text(ids), text_ref)
    # a config that says otherwise (QuickGELU, heads of 64) loses to the arguments
    model, model_cfg = open_clip_model(tmp_path, "gelu_wide")
    model_cfg = json.loads(json.dumps(model_cfg))
    model_cfg["quick_gelu"], model_cfg["vision_cfg"]["head_width"] = True, 64
    save_open_clip(model, model_cfg, tmp_path / "wrong_config")
    image, ids = open_clip_inputs(model)
    image_ref, text_ref = open_clip_features(model, image, ids)
    ours, _ = cl.load(tmp_path / "wrong_config", activation="gelu", vision_head_width=32)
    with torch.no_grad():
        assert_close(ours.encode_image(image), image_ref)
        assert_close(ours.encode_text(ids), text_ref)


def test_non_square_image_without_its_config_is_refused(tmp_path):
    model, model_cfg = open_clip_model(tmp_path, "gelu_wide")
    save_open_clip(model, model_cfg, tmp_path / "bare", config=False)
    with pytest.raises(ValueError, match="24 image positions .* not a square grid.*image_size"):
        cl.load(tmp_path / "bare" / "open_clip_model.safetensors", activation="gelu")


def test_config_that_belongs_to_another_model_is_refused(tmp_path):
    model, model_cfg = open_clip_model(tmp_path, "quickgelu")
    model_cfg = dict(model_cfg, vision_cfg=dict(model_cfg["vision_cfg"], layers=3))
    save_open_clip(model, model_cfg, tmp_path / "model")
    with pytest.raises(ValueError, match="vision_layers = 3, but the weights hold 2"):
        cl.load(tmp_path / "model")


# ----------------------------------------------------------------------------------------------
# No silent guess

WARNING = r"QuickGELU.*heads of 64.*--clip-activation"


def test_a_file_nothing_describes_gets_a_warning_naming_the_assumption(tmp_path, monkeypatch):
    model, _ = open_clip_model(tmp_path, "quickgelu")
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    with pytest.warns(UserWarning, match=WARNING):
        cl.load(tmp_path / "mine.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cl.load(tmp_path / "mine.pt", activation="quick_gelu")  # the caller has said what it is
        # OpenAI's own files: by name (verify=False: this is not the real file) or, renamed, by SHA-256
        (tmp_path / "ViT-B-32.pt").write_bytes((tmp_path / "mine.pt").read_bytes())
        cl.load(tmp_path / "ViT-B-32.pt", verify=False)
        monkeypatch.setitem(cl.OPENAI_SHA256, "ViT-B-16.pt", cl.sha256(str(tmp_path / "mine.pt")))
        cl.load(tmp_path / "mine.pt")


# ----------------------------------------------------------------------------------------------
# Families this CLIP cannot run: refused by name, from the weights or from the config

def open_clip_variant(tmp_path, name, **changes):
    """A tiny open_clip CLIP of another family (built by open_clip), state dict and model_cfg."""
    cfg = json.loads(json.dumps(OPEN_CLIP_TINY["quickgelu"]["model_cfg"]))
    for key, value in changes.items():
        tower, _, field = key.partition("__")
        (cfg[tower] if field else cfg).update({field or tower: value})
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg).eval()
    return model.state_dict(), cfg


@pytest.mark.parametrize("changes, family", [
    (dict(init_logit_bias=-10.0), "SigLIP"),
    (dict(vision_cfg__no_ln_pre=True), "CLIPA"),
    (dict(vision_cfg__ls_init_value=0.1), "layer scale"),
    (dict(text_cfg__vocab_size=1000), "vocabulary"),
    (dict(vision_cfg__qk_norm=True), "custom attention"),
])
def test_other_open_clip_families_are_refused_by_name(tmp_path, changes, family):
    state_dict, cfg = open_clip_variant(tmp_path, "x", **changes)
    torch.save(state_dict, tmp_path / "weights.bin")
    with pytest.raises(ValueError, match=family):  # from the weights alone
        cl.load(tmp_path / "weights.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(ValueError, match=family):  # and with the config beside them
        cl.load(tmp_path / "weights.bin")


@pytest.mark.parametrize("keys, family", [
    (["visual.attn_pool.query", "text_decoder.resblocks.0.ln_1.weight"], "CoCa"),
    (["visual.trunk.blocks.0.mlp.fc1_g.weight"], "EVA"),
    (["visual.trunk.stem.0.weight"], "timm"),
    (["text.token_embedding.weight"], "CustomTextCLIP"),
])
def test_key_layouts_of_other_families_are_refused_by_name(tmp_path, keys, family):
    state_dict, _ = open_clip_variant(tmp_path, "x")
    state_dict.update({key: torch.zeros(1) for key in keys})
    with pytest.raises(ValueError, match=family):
        cl.build_model(state_dict)


@pytest.mark.parametrize("cfg_change, family", [
    ({"vision_cfg": {"timm_model_name": "eva02_base_patch16_clip_224"}}, "timm"),
    ({"vision_cfg": {"attentional_pool": True}}, "CoCa"),
    ({"text_cfg": {"hf_tokenizer_name": "facebook/xlm-v-base"}}, "another vocabulary"),
    ({"text_cfg": {"pool_type": "last"}}, "pool_type"),
    ({"custom_text": True}, "CustomTextCLIP"),
])
def test_configs_of_other_families_are_refused_by_name(tmp_path, cfg_change, family):
    model, model_cfg = open_clip_model(tmp_path, "quickgelu")
    model_cfg = json.loads(json.dumps(model_cfg))
    for key, value in cfg_change.items():
        model_cfg[key] = {**model_cfg[key], **value} if isinstance(value, dict) else value
    save_open_clip(model, model_cfg, tmp_path / "model")
    with pytest.raises(ValueError, match=family):
        cl.load(tmp_path / "model")


# ----------------------------------------------------------------------------------------------
# train.py / eval.py: the options, saved in the checkpoint, rebuild the same model

def test_train_options_are_saved_and_eval_rebuilds_the_same_clip(tmp_path):
    import eval as ev
    import train
    model, _ = open_clip_model(tmp_path, "quickgelu")
    torch.save(model.state_dict(), tmp_path / "clip.bin")  # no config beside it: the options describe it
    options = ["--clip", str(tmp_path / "clip.bin"), "--clip-activation", "gelu", "--clip-vision-head-width", "32",
               "--clip-text-head-width", "16"]
    out = tmp_path / "run"
    train.main(["--out", str(out), "--synthetic-n", "16", "8", "8", "--epochs", "1", "--batch-size", "8",
                "--depth", "1", "--width", "32", "--heads", "2", "--feedback-hidden", "16", *options])
    ckpt = torch.load(out / "best.pt", weights_only=True)
    record = ckpt["config"]["clip"]
    assert record["settings"]["activation"] == "gelu" and record["settings"]["vision_head_width"] == 32
    assert record["settings"]["transformer_heads"] == 4 and record["image_mean"] == list(cl.CLIP_MEAN)
    rebuilt = ev.model_from_checkpoint(ckpt)
    assert rebuilt.clip.config == cl.load(tmp_path / "clip.bin", activation="gelu", vision_head_width=32,
                                          text_head_width=16)[0].config
    # the same weights under OpenAI's defaults would be another function: the settings matter
    clip_state = {k[len("clip."):]: v for k, v in ckpt["model"].items() if k.startswith("clip.")}
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(rebuilt.clip.encode_image(image), cl.build_model(clip_state).encode_image(image),
                                  atol=1e-4)
