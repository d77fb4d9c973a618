"""Slips in feedback.py and model.py that no test saw (found by a mutation review): each test here
fails when the rule is written wrong and passes on the correct code (bench/mutations.py applies each slip
and runs these tests).

6. In training the corrected estimate is the correction of the *perturbed* hypothesis (the one the head
   read and is trained on), as at inference for that hypothesis; more steps at inference than trained run
   (the last step's embedding reused); the hypothesis encoding's frequencies double from one to the next.
8. The contrastive part of loss() uses the temperature of the age logits, exp(logit_scale), not its log.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import clip_loader
from feedback import HypothesisFeedback
from model import CILFCIAE, CILFConfig

B, E, D, N = 6, 16, 24, 5


def feedback_module(steps=2, noise=8.0, seed=0):
    """A HypothesisFeedback whose correction and rating heads are not zero (as after training)."""
    torch.manual_seed(seed)
    module = HypothesisFeedback(E, D, steps=steps, hidden_dim=32, heads=4, age_range=(0.0, 100.0), noise=noise)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def feedback_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ages = torch.arange(0.0, 101.0)
    text = F.normalize(torch.randn(101, E, generator=g), dim=-1)
    return (torch.rand(B, generator=g) * 80 + 10, torch.randn(B, E, generator=g), text, ages,
            torch.randn(B, N, D, generator=g))


# --------------------------------------------------------------------------- 6 feedback

def test_training_corrects_the_perturbed_hypothesis_it_read():
    """y_{r+1} = (the hypothesis rated at step r) + (its correction): in training that hypothesis is
    perturbed, and the corrected estimate must be the one inference would give from it; built from the
    unperturbed estimate instead, the head would be trained toward an error it never saw."""
    module = feedback_module()
    y0, f, text, ages, tokens = feedback_inputs()
    torch.manual_seed(2)
    trained = module.train()(y0, f, text, ages, tokens)
    assert (trained.rated[:, 0] - y0).abs().max() > 0.5   # the hypothesis was perturbed
    with torch.no_grad():   # inference (no perturbation) from the hypothesis rated at step 0
        at_inference = module.eval()(trained.rated[:, 0], f, text, ages, tokens, steps=1)
    torch.testing.assert_close(trained.ages[:, 1], at_inference.ages[:, 1])


def test_more_steps_at_inference_than_trained_reuse_the_last_step():
    module = feedback_module(steps=2, noise=0.0).eval()
    y0, f, text, ages, tokens = feedback_inputs()
    with torch.no_grad():
        two = module(y0, f, text, ages, tokens)
        four = module(y0, f, text, ages, tokens, steps=4)   # step indices 3 and 4 were never trained
    assert four.ages.shape == (B, 5) and four.uncertainty.shape == (B, 5)
    assert torch.isfinite(four.ages).all() and torch.isfinite(four.uncertainty).all()
    torch.testing.assert_close(four.ages[:, :3], two.ages)   # the trained steps are unchanged


def test_hypothesis_encoding_frequencies_double():
    """[z, sin(a_k), cos(a_k)] with a_k = pi 2^k z, z the position in the age range: each frequency twice
    the previous one (the double-angle identities hold between neighbours), the lowest half a turn over
    the range, so the range maps one to one."""
    module = HypothesisFeedback(E, D, steps=1, hidden_dim=32, heads=4, age_range=(10.0, 90.0))
    y = torch.linspace(10.0, 90.0, 33, dtype=torch.float64)
    code = module.encode_age(y)
    k = module.FREQUENCIES
    z, sin, cos = code[:, 0], code[:, 1:1 + k], code[:, 1 + k:]
    torch.testing.assert_close(z, (y - 10.0) / 80.0)
    torch.testing.assert_close(cos[:, 0], torch.cos(math.pi * z))
    torch.testing.assert_close(sin[:, 1:], 2 * sin[:, :-1] * cos[:, :-1])
    torch.testing.assert_close(cos[:, 1:], cos[:, :-1] ** 2 - sin[:, :-1] ** 2)


# --------------------------------------------------------------------------- 8 the contrastive part of loss()

def test_contrastive_part_uses_the_temperature_of_the_age_logits():
    """loss()'s contrastive part, by hand: soft-target symmetric matching of f_i against the true-age texts
    T[y_j], scaled by the multiplier the age logits use (exp(logit_scale) = 20 here, not its log 3.0)."""
    torch.manual_seed(0)
    clip = clip_loader.CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
                            vision_patch_size=16, context_length=16, vocab_size=49408, transformer_width=64,
                            transformer_heads=1, transformer_layers=1)
    model = CILFCIAE(clip, CILFConfig(depth=0, feedback_steps=0, contrastive_sigma=3.0)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    y = torch.tensor([20.0, 35.0, 35.0, 60.0])
    out = model(torch.randn(4, 3, 32, 32))
    _, parts = model.loss(out, y)
    f, text = out.embedding, out.text_embeddings
    scale = out.logits[0, 0] / (f[0] @ text[0])   # the multiplier of the age logits
    assert scale.item() == pytest.approx(20.0, rel=1e-4)
    sim = scale * f @ text[y.long()].t()   # whole ages: T[y_j] is the interpolated text exactly
    q = torch.exp(-(y[:, None] - y[None, :]) ** 2 / (2 * 3.0 ** 2))
    q = q / q.sum(1, keepdim=True)
    expected = (-(q * sim.log_softmax(1)).sum(1).mean() - (q * sim.t().log_softmax(1)).sum(1).mean()) / 2
    assert parts["contrastive"].item() == pytest.approx(expected.item(), rel=1e-5)
