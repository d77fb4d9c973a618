"""Tests of model.py: every switch changes what it should and nothing else, gradients, the contrastive
targets by hand, the plain-CLIP reduction, bf16 autocast, ViT and ResNet backbones, other resolutions."""
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_loader
from model import (AgeOutput, CILFCIAE, CILFConfig, LinearAgeBaseline, LinearBaselineConfig, config_problem,
                   contrastive_loss, gaussian_label_distribution, soft_contrastive_targets)

CTX = 16  # context length of the tiny text towers; the longest prompt needs 12 tokens
MIXERS = ("linear", "fourier", "softmax", "none")


def tiny_clip(kind, seed=0):
    """A random CLIP small enough for a unit test: ViT at 32 px (4x4 grid) or ResNet at 64 px (2x2)."""
    torch.manual_seed(seed)
    if kind == "vit":
        return clip_loader.CLIP(32, 32, 2, 64, 8, CTX, 49408, 32, 2, 1)
    return clip_loader.CLIP(32, 64, (1, 1, 1, 1), 8, None, CTX, 49408, 32, 2, 1)


def build(clip, seed=0, **overrides):
    options = dict(max_age=30.0, width=32, heads=2, feedback_hidden=32)
    options.update(overrides)
    torch.manual_seed(seed)
    return CILFCIAE(clip, CILFConfig(**options))


def wake(model, seed=1):
    """Give the zero-initialised output layers (fusion W_out, error head) weights, so every path acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layers = [model.fusion.out_proj] if model.fusion is not None else []
        if model.feedback is not None:   # the zero last layer of either design's correction
            head = model.feedback.head if hasattr(model.feedback, "head") else model.feedback.correction
            layers.append(head[-1])
        for layer in layers:
            layer.weight.copy_(0.1 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
    return model


def images(clip, n=4, resolution=None, seed=0):
    r = resolution or clip.visual.input_resolution
    return torch.randn(n, 3, r, r, generator=torch.Generator().manual_seed(seed))


def hand_text_embeddings(clip, ages):
    prompts = [f"a photo of a {a:g} year old person." for a in ages.tolist()]
    return F.normalize(clip.encode_text(clip_loader.tokenize(prompts, context_length=CTX)), dim=-1)


@pytest.fixture(scope="module")
def vit():
    return tiny_clip("vit")


@pytest.fixture(scope="module")
def resnet():
    return tiny_clip("resnet")


TARGET = torch.tensor([3.0, 12.5, 12.5, 27.0])


# ---- configuration and prompts ------------------------------------------------------------------

def test_ages_and_prompts():
    c = CILFConfig()
    assert torch.equal(c.ages(), torch.arange(101.0))
    assert c.prompts()[37] == "a photo of a 37 year old person."
    c = CILFConfig(min_age=16, max_age=20, age_step=2.5, prompt_template="age {}")
    assert c.ages().tolist() == [16.0, 18.5]
    assert c.prompts() == ["age 16", "age 18.5"]
    with pytest.raises(ValueError, match="age_step"):
        CILFConfig(age_step=0).ages()


def test_config_rules_across_fields_by_hand():
    """model.config_problem, the rules train.py applies to its options and eval.py to a checkpoint: the age
    classes within [0, limit], min below max; the fusion width split evenly into heads, for CILFConfig only
    (the ce-baseline has no fusion)."""
    assert config_problem(CILFConfig(min_age=0, max_age=120, width=30, heads=5), 120) is None
    assert config_problem(CILFConfig(min_age=0, max_age=120.5), 120)[0] == "max_age"
    assert config_problem(CILFConfig(min_age=20, max_age=20), 120)[0] == "max_age"
    assert config_problem(CILFConfig(min_age=-1, max_age=20), 120)[0] == "max_age"
    assert config_problem(CILFConfig(width=30, heads=4), 120) == ("heads", "must divide the fusion width 30, not 4")
    assert config_problem(LinearBaselineConfig(min_age=50, max_age=20), 120)[0] == "max_age"
    assert config_problem(LinearBaselineConfig(), 100) is None


def test_bad_mixer_is_named(vit):
    with pytest.raises(ValueError, match="mixer"):
        build(vit, mixer="attention")


# ---- plain CLIP ---------------------------------------------------------------------------------

def test_zero_shot_is_clip_prompt_classification(vit):
    model = build(vit).eval()
    x = images(vit)
    with torch.no_grad():
        out = model.zero_shot(x)
        T = hand_text_embeddings(vit, model.ages)
        logits = vit.logit_scale.exp() * F.normalize(vit.encode_image(x), dim=-1) @ T.t()
        # OpenAI's forward gives the same logits for the same prompts.
        clip_logits, _ = vit(x, clip_loader.tokenize(model.config.prompts(), context_length=CTX))
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.logits, clip_logits)
    torch.testing.assert_close(out.age, logits.softmax(1) @ model.ages)
    assert out.ages_per_step.shape == (4, 1) and torch.equal(out.uncertainty, torch.zeros(4))


@pytest.mark.parametrize("mixer", MIXERS)
def test_untrained_fusion_starts_as_plain_clip(vit, mixer):
    """W_out = 0 and a zero error head: f == normalize(g) and y_R == y0 before any training."""
    model = build(vit, mixer=mixer).eval()
    x = images(vit)
    with torch.no_grad():
        out, zs = model(x), model.zero_shot(x)
    torch.testing.assert_close(out.embedding, zs.embedding)
    torch.testing.assert_close(out.logits, zs.logits)  # same temperature at start
    assert torch.equal(out.ages_per_step, out.ages_per_step[:, :1].expand(-1, 3))


def hand_kl(logp, targets, ages, sigmas):
    """Mean over images of KL(discretised N(y, sigma^2) || p), in plain Python: logp (B, K), sigma per image."""
    kl = 0.0
    for b, (y, sigma) in enumerate(zip(targets, sigmas)):
        w = [math.exp(-(a - y) ** 2 / (2 * sigma ** 2)) for a in ages]
        s = sum(w)
        kl += sum(wk / s * (math.log(wk / s) - logp[b][k]) for k, wk in enumerate(w) if wk > 0)
    return kl / len(targets)


def test_everything_off_is_a_clip_prompt_classifier_trained_with_the_distribution_loss(vit):
    model = build(vit, depth=0, feedback_steps=0, contrastive_weight=0, l1_weight=0,
                  freeze_image_tower=True, freeze_text_tower=True, sigma_y=1.5)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["logit_scale"]
    x = images(vit)
    out = model(x)
    total, parts = model.loss(out, TARGET)
    with torch.no_grad():  # by hand
        T = hand_text_embeddings(vit, model.ages)
        logits = model.logit_scale.exp() * F.normalize(vit.encode_image(x), dim=-1) @ T.t()
        kl = hand_kl(logits.log_softmax(1).tolist(), TARGET.tolist(), model.ages.tolist(), [1.5] * len(TARGET))
    torch.testing.assert_close(out.logits, logits)
    assert list(parts) == ["distribution"]
    assert total.item() == pytest.approx(kl, rel=1e-5)
    torch.testing.assert_close(out.age, logits.softmax(1) @ model.ages)
    torch.testing.assert_close(gaussian_label_distribution(TARGET, model.ages, 1.5).sum(1), torch.ones(4))


def test_the_distribution_part_with_a_sigma_per_image_by_hand(vit):
    """label_sigma age-std: image b's target is N(y_b, sigma_b^2) over the classes, sigma_b its apparent-age
    std, at least 1 year, and sigma_y where it has none (nan); without stds, or with label_sigma fixed,
    every image has sigma_y."""
    options = dict(sigma_y=1.5, depth=0, feedback_steps=0, contrastive_weight=0, l1_weight=0)
    per_image, fixed = build(vit, label_sigma="age-std", **options), build(vit, label_sigma="fixed", **options)
    out = per_image(images(vit))
    age_std = torch.tensor([float("nan"), 0.3, 4.0, 2.5])
    logp = out.logits.detach().log_softmax(1).tolist()
    kl = lambda sigmas: hand_kl(logp, TARGET.tolist(), per_image.ages.tolist(), sigmas)
    assert per_image.loss(out, TARGET, age_std=age_std)[1]["distribution"].item() == pytest.approx(
        kl([1.5, 1.0, 4.0, 2.5]), rel=1e-5)
    for model, std in ((per_image, None), (fixed, age_std)):
        assert model.loss(out, TARGET, age_std=std)[1]["distribution"].item() == pytest.approx(kl([1.5] * 4), rel=1e-5)


# ---- switches -----------------------------------------------------------------------------------

def _same_forward(a: AgeOutput, b: AgeOutput):
    for name in ("logits", "probs", "ages_per_step", "age", "uncertainty", "embedding"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("weight", ["contrastive_weight", "l1_weight", "distribution_weight",
                                   "feedback_weight", "uncertainty_weight"])
def test_a_zero_loss_weight_removes_exactly_its_part(vit, weight):
    part = weight[: -len("_weight")]
    on = wake(build(vit, **{weight: 1.0})).eval()
    off = build(vit, **{weight: 0.0}).eval()
    off.load_state_dict(on.state_dict())
    x = images(vit)
    out_on, out_off = on(x), off(x)
    _same_forward(out_on, out_off)
    total_on, parts_on = on.loss(out_on, TARGET)
    total_off, parts_off = off.loss(out_off, TARGET)
    assert set(parts_on) - set(parts_off) == {part}
    for k in parts_off:
        assert torch.equal(parts_on[k], parts_off[k])
    torch.testing.assert_close(total_on - total_off, getattr(on.config, weight) * parts_on[part])


def test_y0_keeps_its_own_l1_with_and_without_feedback(vit):
    """The L1 on y0 is on by default whether the feedback is on or off (the feedback loss never reaches
    y0); --l1-weight 0 leaves y0 to the distribution loss."""
    assert CILFConfig().l1_weight == CILFConfig(feedback_steps=0).l1_weight == 1.0
    for steps, l1_weight, l1 in ((2, 1.0, True), (0, 1.0, True), (2, 0.0, False)):
        model = build(vit, feedback_steps=steps, l1_weight=l1_weight)
        out = model(images(vit))
        _, parts = model.loss(out, TARGET)
        assert ("l1" in parts) == l1 and ("feedback" in parts) == (steps > 0)
        if l1:   # the L1 of y0 = E_p[a], the distribution's expectation, before any correction
            torch.testing.assert_close(parts["l1"], (out.probs @ model.ages - TARGET).abs().mean())


def test_feedback_steps_zero_turns_feedback_off_and_nothing_else(vit):
    on = wake(build(vit, feedback_steps=2, l1_weight=1.0)).eval()
    off = build(vit, feedback_steps=0, l1_weight=1.0).eval()
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("feedback.") for k in unexpected)
    assert off.feedback is None
    x = images(vit)
    out_on, out_off = on(x), off(x)
    assert out_on.ages_per_step.shape == (4, 3) and out_off.ages_per_step.shape == (4, 1)
    assert torch.equal(out_off.age, out_off.ages_per_step[:, 0])
    assert torch.equal(out_off.uncertainty, torch.zeros(4))
    for name in ("logits", "probs", "embedding"):
        assert torch.equal(getattr(out_on, name), getattr(out_off, name))
    assert torch.equal(out_on.ages_per_step[:, 0], out_off.age)          # same y0
    assert not torch.allclose(out_on.age, out_off.age)                   # the loop corrected it
    _, parts_on = on.loss(out_on, TARGET)
    _, parts_off = off.loss(out_off, TARGET)
    assert set(parts_on) - set(parts_off) == {"feedback", "uncertainty"}
    for k in parts_off:
        assert torch.equal(parts_on[k], parts_off[k])


def test_training_loss_rates_the_clean_chain_too(vit):
    model = wake(build(vit, uncertainty_loss="l1")).train()
    torch.manual_seed(0)
    out = model(images(vit))
    assert out.clean_rated_per_step is not None and (out.clean_rated_per_step != out.rated_per_step).any()
    _, parts = model.loss(out, TARGET)
    # by hand from the outputs: the mean of the perturbed chain's and the clean chain's |u - |y - rated||
    term = lambda u, rated: (u - (rated - TARGET[:, None]).abs()).abs().mean()
    want = (term(out.uncertainty_per_step, out.rated_per_step)
            + term(out.clean_uncertainty_per_step, out.clean_rated_per_step)) / 2
    torch.testing.assert_close(parts["uncertainty"], want.detach())
    evaluated = model.eval()(images(vit))
    assert evaluated.clean_rated_per_step is None and evaluated.clean_uncertainty_per_step is None


def test_random_text_embeddings_replace_the_prompts_everywhere(vit, monkeypatch):
    model = wake(build(vit, text_embeddings="random")).train()
    K, E = len(model.ages), vit.embed_dim
    hand = F.normalize(torch.randn(K, E, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(model.text_embeddings(), hand)

    def refuse(tokens):
        raise AssertionError("the text tower was read")

    monkeypatch.setattr(vit, "encode_text", refuse)   # logits, fusion, feedback and loss read T: none may ask
    out = model(images(vit))
    _, parts = model.loss(out, TARGET)
    torch.testing.assert_close(out.logits, model.temperature() * out.embedding @ hand.t())
    torch.testing.assert_close(parts["contrastive"], contrastive_loss(out.embedding, hand, model.ages, TARGET,
                                                                      model.temperature(), 2.0))
    state = model.state_dict()   # saved with the model: a rebuilt model reads the saved vectors
    state["random_text"] = -state["random_text"]
    rebuilt = build(vit, text_embeddings="random")
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt.text_embeddings(), -hand)


def test_anchored_feedback_reads_a_frozen_copy_of_the_pretrained_image_tower():
    import train
    clip, pretrained = tiny_clip("vit", seed=3), tiny_clip("vit", seed=3)   # the same weights, one kept apart
    model = wake(build(clip, feedback_design="anchored")).train()
    assert not model.anchor.training and not any(p.requires_grad for p in model.anchor.parameters())
    groups = model.param_groups(1e-2, 1e-2, 0.05)
    anchor_ids = {id(p) for p in model.anchor.parameters()}
    assert not anchor_ids & {id(p) for g in groups for p in g["params"]}   # left out of the optimizer
    assert not [n for n in train.freeze_untrained(model, torch.device("cpu")) if n.startswith("feedback.")]
    opt = torch.optim.AdamW(groups)
    x = images(clip)
    model.loss(model(x), TARGET)[0].backward()
    opt.step()
    assert not torch.equal(model.clip.visual.conv1.weight, pretrained.visual.conv1.weight)   # the tower trained
    for name, value in pretrained.visual.state_dict().items():                                # its copy did not
        assert torch.equal(model.anchor.state_dict()[name], value), name
    assert all(k in model.state_dict() for k in ("anchor.conv1.weight", "anchor.proj"))      # saved with it
    seen = {}
    model.feedback.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model.eval()(x)
        a = F.normalize(pretrained.encode_image(x), dim=-1)
        T = hand_text_embeddings(pretrained, model.ages)
        y_zs = (pretrained.logit_scale.exp() * a @ T.t()).softmax(dim=1) @ model.ages
    torch.testing.assert_close(seen["anchor"][0], a)
    torch.testing.assert_close(seen["anchor"][1], y_zs)


def _perturb_tokens(monkeypatch, clip):
    original = clip.encode_image_tokens

    def noisy(image):
        g, tokens, grid = original(image)
        return g, tokens + torch.randn_like(tokens), grid

    monkeypatch.setattr(clip, "encode_image_tokens", noisy)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_mixer_none_never_reads_the_image_tokens(monkeypatch, kind, mixer):
    clip = tiny_clip(kind)
    model = wake(build(clip, mixer=mixer)).eval()
    x = images(clip, n=2)
    with torch.no_grad():
        clean = model(x).embedding
        _perturb_tokens(monkeypatch, clip)
        noisy = model(x).embedding
    if mixer == "none":
        assert torch.equal(clean, noisy)
        assert not any(n.startswith("fusion.") and ("mix" in n or "position" in n) for n, _ in model.named_parameters())
    else:
        assert (clean - noisy).abs().max() > 1e-4


@pytest.mark.parametrize("mixer", ["linear", "fourier"])
def test_token_mixers_are_different_modules(vit, mixer):
    model = build(vit, mixer=mixer)
    kinds = {type(b.mix).__name__ for b in model.fusion.blocks}
    assert kinds == {"LinearAttention" if mixer == "linear" else "FourierMixer"}


@pytest.mark.parametrize("cross", [True, False])
def test_cross_attention_switch_decides_whether_the_fusion_reads_the_text(vit, cross):
    model = wake(build(vit, cross_attention=cross)).eval()
    with torch.no_grad():
        g, tokens, grid = vit.encode_image_tokens(images(vit, n=2))
        T = model.text_embeddings()
        f1 = model.fusion(g, tokens, grid, T)[0]
        f2 = model.fusion(g, tokens, grid, F.normalize(torch.randn_like(T), dim=-1))[0]  # other texts
    if cross:
        assert (f1 - f2).abs().max() > 1e-4
    else:
        assert torch.equal(f1, f2)
        assert model.fusion.text_proj is None and all(b.cross is None for b in model.fusion.blocks)


def test_depth_zero_means_no_fusion(vit):
    model = build(vit, depth=0, feedback_steps=0)
    assert model.fusion is None
    x = images(vit)
    with torch.no_grad():
        torch.testing.assert_close(model(x).embedding, F.normalize(vit.encode_image(x), dim=-1))


# ---- text embeddings: cached while frozen, re-encoded while trained -----------------------------

def _count_text_calls(monkeypatch, clip):
    calls = []
    original = clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda text: calls.append(1) or original(text))
    return calls


def test_frozen_text_tower_encodes_the_prompts_once(monkeypatch):
    clip = tiny_clip("vit")
    model = build(clip)
    calls = _count_text_calls(monkeypatch, clip)
    x = images(clip, n=2)
    model(x)
    model(x)
    model.zero_shot(x)
    assert len(calls) == 1
    keys = model.state_dict().keys()
    assert "ages" in keys and not any("cache" in k or "prompt_tokens" in k for k in keys)
    # A loaded state dict replaces the cache: the new text tower's embeddings are used.
    state = model.state_dict()
    state["clip.text_projection"] = torch.randn_like(state["clip.text_projection"])
    model.load_state_dict(state)
    T = model.text_embeddings()
    assert len(calls) == 2
    torch.testing.assert_close(T, hand_text_embeddings(clip, model.ages).detach())


def test_prompts_are_encoded_in_full_float32_whatever_the_tf32_setting(monkeypatch):
    """eval.configure_device turns TF32 on for GPUs; the age prompts, whose neighbours differ by ~1e-4 per
    coordinate, are encoded with full float32 matmuls all the same, and the setting outside is kept."""
    clip = tiny_clip("vit")
    model = build(clip)
    seen, encode = [], clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda tokens: (seen.append(torch.get_float32_matmul_precision()),
                                                             encode(tokens))[1])
    outside = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        model.text_embeddings()
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(outside)


def test_trained_text_tower_is_encoded_every_step_and_learns(monkeypatch):
    clip = tiny_clip("vit")
    model = build(clip, freeze_text_tower=False)
    calls = _count_text_calls(monkeypatch, clip)
    x = images(clip, n=2)
    model(x)
    total, _ = model.loss(model(x), TARGET[:2])
    total.backward()
    assert len(calls) == 2
    assert clip.text_projection.grad is not None and clip.text_projection.grad.abs().sum() > 0


def test_model_pickles_with_its_cache(vit):
    model = wake(build(vit)).eval()
    x = images(vit, n=2)
    with torch.no_grad():
        want = model(x).age
        copy = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(copy(x).age, want)


def test_state_dict_rebuilds_the_clip_model(vit):
    model = build(vit)
    state = {k[len("clip."):]: v for k, v in model.state_dict().items() if k.startswith("clip.")}
    rebuilt = clip_loader.build_model(state)
    x = images(vit)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(x), vit.eval().encode_image(x))


# ---- gradients and freezing ---------------------------------------------------------------------

def _check_gradients(model, x, target):
    """One optimiser step (moves the zero-initialised layers), then every trainable parameter gets a
    gradient and no frozen one does."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        total, _ = model.loss(model(x), target)
        total.backward()
        if step == 0:
            opt.step()
    # with a single fused token (mixer none), the re-reading's softmax over one key is 1: no key gradient
    one_token = model.config.mixer == "none" or model.fusion is None
    for name, p in model.named_parameters():
        if one_token and name.startswith("feedback.key."):
            continue
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_trainable_parameter_vit(mixer):
    clip = tiny_clip("vit")
    model = build(clip, mixer=mixer, freeze_image_tower=False, freeze_text_tower=True).train()
    _check_gradients(model, images(clip), TARGET)
    assert all(p.grad is None for n, p in clip.named_parameters() if not n.startswith("visual."))
    assert all(p.grad is not None for p in clip.visual.parameters())


def test_gradients_with_frozen_resnet_and_trained_text_tower_keep_batchnorm_still():
    clip = tiny_clip("resnet")
    model = build(clip, mixer="fourier", freeze_image_tower=True, freeze_text_tower=False).train()
    assert not clip.visual.training and model.fusion.training and clip.transformer.training
    stats = {n: b.clone() for n, b in clip.visual.named_buffers()}
    _check_gradients(model, images(clip), TARGET)
    assert all(p.grad is None for p in clip.visual.parameters())
    assert clip.text_projection.grad is not None
    for n, b in clip.visual.named_buffers():
        assert torch.equal(b, stats[n]), n  # frozen BatchNorm: running statistics unchanged
    model.train()  # train() again keeps the frozen tower in eval mode
    assert not clip.visual.training


def test_trained_resnet_tower_is_in_train_mode():
    clip = tiny_clip("resnet")
    build(clip, freeze_image_tower=False).train()
    assert clip.visual.training
    assert not clip.transformer.training  # text tower frozen by default
    assert not clip.logit_scale.requires_grad


def test_param_groups(vit):
    model = build(vit, freeze_image_tower=False)
    groups = model.param_groups(clip_lr=1e-5, new_lr=1e-3, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"clip_decay", "clip_no_decay", "new_decay", "new_no_decay"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for n in ("logit_scale", "fusion.global_embedding", "fusion.position_embedding", "fusion.in_norm.weight",
              "fusion.in_proj.bias", "clip.visual.class_embedding", "clip.visual.positional_embedding"):
        assert n in no_decay, n
    for n in ("fusion.in_proj.weight", "fusion.out_proj.weight", "clip.visual.proj", "feedback.query.0.weight"):
        assert n in decay, n
    assert by_name["clip_decay"]["lr"] == 1e-5 and by_name["new_no_decay"]["lr"] == 1e-3
    torch.optim.AdamW(groups)  # accepted as is


# ---- contrastive module -------------------------------------------------------------------------

def test_soft_contrastive_targets_hand_computed_with_repeated_ages():
    q = soft_contrastive_targets(torch.tensor([20.0, 20.0, 22.0]), sigma=2.0)
    e = math.exp(-0.5)  # (22 - 20)^2 / (2 * 2^2) = 0.5
    want = torch.tensor([[1, 1, e], [1, 1, e], [e, e, 1]])
    want = want / want.sum(1, keepdim=True)
    torch.testing.assert_close(q, want)
    assert q[0, 0] == q[0, 1]  # a same-age pair is as positive as the pair itself


def test_contrastive_loss_hand_computed():
    ages = torch.tensor([0.0, 1.0, 2.0])
    T = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    f = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    y = [1.0, 1.0, 1.5]
    scale, sigma = 10.0, 1.0
    mid = [0.3, 0.9]  # halfway between T[1] and T[2], then normalised
    n = math.hypot(*mid)
    texts = [[0.6, 0.8], [0.6, 0.8], [mid[0] / n, mid[1] / n]]
    s = [[scale * sum(a * b for a, b in zip(fi, tj)) for tj in texts] for fi in f.tolist()]
    q = [[math.exp(-(yi - yj) ** 2 / (2 * sigma ** 2)) for yj in y] for yi in y]

    def ce(logits, targets):
        return -sum(t * (l - math.log(sum(math.exp(v) for v in logits))) for t, l in zip(targets, logits))

    i2t = sum(ce(s[i], [v / sum(q[i]) for v in q[i]]) for i in range(3)) / 3
    # text j's target over the images i is column j of the unnormalised q, normalised
    t2i = sum(ce([s[i][j] for i in range(3)], [q[i][j] / sum(q[k][j] for k in range(3)) for i in range(3)])
              for j in range(3)) / 3
    got = contrastive_loss(f, T, ages, torch.tensor(y), scale, sigma)
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_contrastive_loss_with_distinct_ages_is_clip_infonce():
    torch.manual_seed(0)
    T, f = F.normalize(torch.randn(11, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    y = torch.tensor([0.0, 3.0, 5.0, 8.0, 10.0])
    sim = 20 * f @ T[y.long()].t()
    labels = torch.arange(5)
    infonce = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2
    got = contrastive_loss(f, T, torch.arange(11.0), y, 20.0, sigma=0.05)
    torch.testing.assert_close(got, infonce)


# ---- backbones, autocast, resolutions -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("mixer", ["linear", "fourier", "softmax"])
def test_bf16_autocast_shapes_and_finiteness(kind, mixer):
    clip = tiny_clip(kind)
    model = wake(build(clip, mixer=mixer, freeze_image_tower=False)).train()
    x = images(clip)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        total, parts = model.loss(out, TARGET)
    total.backward()
    K = model.ages.numel()
    assert out.logits.shape == (4, K) and out.probs.shape == (4, K)
    assert out.ages_per_step.shape == (4, 3) and out.age.shape == (4,) and out.uncertainty.shape == (4,)
    assert out.embedding.shape == (4, clip.embed_dim)
    for t in (out.logits, out.probs, out.ages_per_step, out.uncertainty, out.embedding, total, *parts.values()):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert (out.uncertainty >= 0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind,resolution", [("vit", 48), ("vit", 24), ("resnet", 96), ("resnet", 32)])
@pytest.mark.parametrize("mixer", ["linear", "fourier"])
def test_other_input_resolutions(kind, resolution, mixer):
    clip = tiny_clip(kind)
    model = wake(build(clip, mixer=mixer)).eval()
    x = images(clip, n=2, resolution=resolution)
    with torch.no_grad():
        _, tokens, grid = clip.encode_image_tokens(x)
        out = model(x)
    stride = 8 if kind == "vit" else 32
    assert grid == (resolution // stride,) * 2 and tokens.shape[1] == grid[0] * grid[1]
    assert out.embedding.shape == (2, 32) and torch.isfinite(out.logits).all()
    assert model.fusion._positions(grid).shape == (1, grid[0] * grid[1], 32)


# ---- findings of the independent review ---------------------------------------------

def test_temperature_trains_from_clips_cap():
    """Every released CLIP ends at the cap, log 100 (just above it in float32): the temperature must still
    get a gradient at step 0, and the cap holds after each optimizer step (clamp_logit_scale)."""
    clip = tiny_clip("vit")
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(100.0))
    model = build(clip)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    x = images(clip)
    total, _ = model.loss(model(x), TARGET)
    total.backward()
    grad = model.logit_scale.grad
    assert grad is not None and grad.item() != 0.0 and math.isfinite(grad.item())
    # A step that raises the temperature is cut back to the cap; one that lowers it is kept.
    cap = torch.tensor(math.log(100.0), dtype=torch.float32)
    for direction in (-1.0, 1.0):
        with torch.no_grad():
            model.logit_scale.fill_(cap.item() - direction * 0.5)
        model.clamp_logit_scale()
        assert model.logit_scale.item() == pytest.approx(min(cap.item(), cap.item() - direction * 0.5))
    assert model.logit_scale <= cap


@pytest.mark.parametrize("freeze_text_tower", [False, True])
def test_age_prompts_are_float32_under_bf16_autocast(vit, freeze_text_tower):
    model = build(vit, freeze_text_tower=freeze_text_tower)
    with torch.no_grad():
        reference = hand_text_embeddings(vit, model.ages)            # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):                # the frozen cache is filled in here
        text = model.text_embeddings()
        out = model(images(vit))
    assert text.dtype == torch.float32
    torch.testing.assert_close(text, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_embeddings, reference, atol=1e-5, rtol=0)


def _batchnorms(clip):
    return [m for m in clip.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("clip_bn", ["frozen", "train"])
def test_trained_resnet_tower_batchnorm_statistics_frozen_by_default(clip_bn):
    clip = tiny_clip("resnet")
    options = {} if clip_bn == "frozen" else {"clip_bn": "train"}   # frozen is the default
    model = build(clip, freeze_image_tower=False, **options).train()
    assert _batchnorms(clip) and clip.visual.training and model.fusion.training
    assert all(bn.training == (clip_bn == "train") for bn in _batchnorms(clip))
    stats = {n: b.clone() for n, b in clip.visual.named_buffers() if "running" in n}
    total, _ = model.loss(model(images(clip)), TARGET)
    total.backward()
    moved = [n for n, b in clip.visual.named_buffers() if "running" in n and not torch.equal(b, stats[n])]
    assert bool(moved) == (clip_bn == "train")
    assert all(bn.weight.grad is not None for bn in _batchnorms(clip))   # the affine weights still train
    with pytest.raises(ValueError, match="clip_bn"):
        build(clip, clip_bn="sync")


def test_no_weight_decay_on_the_fourier_filter(vit):
    model = build(vit, mixer="fourier", depth=2)
    groups = model.param_groups(clip_lr=1e-5, new_lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    filters = [n for n in decay if n.endswith("mix.complex_weight")]
    assert len(filters) == 2 and all(decay[n] == 0.0 for n in filters)
    assert decay["fusion.blocks.0.mlp.0.weight"] == 0.05


def test_age_classes_reach_116_and_predictions_are_clipped_to_them(vit):
    model = build(vit, max_age=116.0)
    assert model.ages[-1].item() == 116.0 and model.config.prompts()[-1] == "a photo of a 116 year old person."
    wake(model)
    with torch.no_grad():                                            # corrections far past both ends
        model.feedback.correction[-1].bias[0] = 50.0
        high = model.eval()(images(vit))
        model.feedback.correction[-1].bias[0] = -50.0
        low = model(images(vit))
    assert (high.ages_per_step[:, -1] > 116).all() and torch.equal(high.age, torch.full((4,), 116.0))
    assert (low.ages_per_step[:, -1] < 0).all() and torch.equal(low.age, torch.zeros(4))


def test_fourier_global_token_passes_the_mixing_step_unchanged(vit):
    """The global token bypasses the Fourier mixer: with no cross-attention and a zero MLP output layer,
    a block returns it exactly as it came in (it used to get LN(z_g) added)."""
    from model import FusionBlock
    torch.manual_seed(0)
    block = FusionBlock(16, 2, 2.0, 0.0, "fourier", (3, 3), cross_attention=False)
    with torch.no_grad():
        block.mlp[-1].weight.zero_()
        block.mlp[-1].bias.zero_()
    z = torch.randn(2, 1 + 9, 16)
    out = block(z, None, (3, 3))
    assert torch.equal(out[:, 0], z[:, 0])
    assert not torch.allclose(out[:, 1:], z[:, 1:])                  # the grid tokens are mixed


# ---- the ce-baseline ----------------------------------------------------------------------------------

def test_ce_baseline_is_a_linear_head_with_a_hand_computed_cross_entropy(vit):
    """LinearAgeBaseline by hand (numpy, float64): logits W g + b on CLIP's image embedding; the loss is
    -log p of the true class for a whole age, split 75/25 between 12 and 13 for 12.25 (25/75 for 12.75);
    the age the expectation, the uncertainty the standard deviation of p."""
    model = LinearAgeBaseline(vit, LinearBaselineConfig(max_age=30.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.head.weight.copy_(0.3 * torch.randn(model.head.weight.shape, generator=g))
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=g))
    x = images(vit)
    out = model(x)
    loss, parts = model.loss(out, torch.tensor([3.0, 12.25, 12.75, 27.0]))
    with torch.no_grad():
        feature = vit.encode_image(x).double().numpy()
    W, b = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    logits = feature @ W.T + b   # (4, 31)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    hand = -np.mean([log_p[0, 3], 0.75 * log_p[1, 12] + 0.25 * log_p[1, 13],
                     0.25 * log_p[2, 12] + 0.75 * log_p[2, 13], log_p[3, 27]])
    assert loss.item() == pytest.approx(hand, rel=1e-5) and list(parts) == ["cross_entropy"]
    p, ages = np.exp(log_p), np.arange(31.0)
    mean = p @ ages
    assert out.age.detach().double().numpy() == pytest.approx(mean, abs=1e-4)
    assert out.uncertainty.detach().double().numpy() == pytest.approx(np.sqrt(p @ ages ** 2 - mean ** 2), abs=1e-3)
    assert out.ages_per_step.shape == (4, 1) and out.text_embeddings is None


def test_ce_baseline_starts_at_the_mean_class_and_trains_only_image_tower_and_head(vit):
    model = LinearAgeBaseline(vit, LinearBaselineConfig(max_age=30.0))
    out = model(images(vit))
    assert torch.allclose(out.age, torch.full((4,), 15.0))   # zero head: uniform over 0..30
    assert torch.allclose(out.uncertainty, torch.full((4,), math.sqrt(sum((a - 15) ** 2 for a in range(31)) / 31)))
    groups = {g["name"]: g for g in model.param_groups(1e-5, 1e-3, 0.05)}
    assert {id(p) for p in groups["new_decay"]["params"]} == {id(model.head.weight)}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"head.weight", "head.bias"} | {f"clip.visual.{n}" for n, _ in vit.visual.named_parameters()}
    model.train()
    assert model.training and not model.clip.transformer.training   # the unread text tower stays in eval mode
