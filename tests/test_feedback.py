"""Tests of feedback.py: the inverse map, the error-feedback loop and its loss, on a controlled problem."""
import math

import pytest
import torch
import torch.nn.functional as F

from feedback import ErrorFeedback, FeedbackOutput, HypothesisFeedback, feedback_loss, interpolate_age_embedding


def spearman(a, b):
    """Rank correlation by hand: Pearson correlation of the ranks (continuous data, no ties)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def randomise_head(fb, seed=0):
    """Give the zero-initialised last layer weights, so the loop does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = fb.head[-1]
        last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=g))
        last.bias.copy_(0.3 * torch.randn(last.bias.shape, generator=g))


# ---- inverse map -------------------------------------------------------------------------------

def test_inverse_map_exact_at_whole_ages_uneven_spacing():
    ages = torch.tensor([0.0, 1.0, 2.0, 4.0, 7.0, 10.0])
    T = torch.randn(6, 5)
    assert torch.equal(interpolate_age_embedding(T, ages, ages.clone()), T)


def test_inverse_map_hand_computed_between_ages_and_clamped():
    ages = torch.tensor([0.0, 1.0, 2.0, 4.0, 7.0, 10.0])
    T = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([3.0, 5.5, 6.25, -3.0, 12.0, 0.25], dtype=torch.float64)
    got = interpolate_age_embedding(T, ages, y)
    want = torch.stack([0.5 * T[2] + 0.5 * T[3],           # 3 is halfway from 2 to 4
                        0.5 * T[3] + 0.5 * T[4],           # 5.5 is halfway from 4 to 7
                        0.25 * T[3] + 0.75 * T[4],         # 6.25 = 4 + 0.75 * 3
                        T[0], T[5],                        # clamped to the range
                        0.75 * T[0] + 0.25 * T[1]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_inverse_map_gradcheck():
    ages = torch.tensor([10.0, 11.0, 13.0, 16.0, 20.0], dtype=torch.float64)
    T = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    # Away from the kinks at whole ages, where the derivative jumps.
    y = torch.tensor([10.3, 12.1, 14.7, 17.5, 19.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, yy: interpolate_age_embedding(t, ages, yy), (T, y))


def test_inverse_map_derivative_is_neighbour_difference():
    ages = torch.arange(0.0, 5.0)
    T = torch.randn(5, 3)
    y = torch.tensor([2.4], requires_grad=True)
    interpolate_age_embedding(T, ages, y).sum().backward()
    torch.testing.assert_close(y.grad, (T[3] - T[2]).sum().reshape(1))


def test_inverse_map_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="text_emb"):
        interpolate_age_embedding(torch.randn(5, 3), torch.arange(4.0), torch.tensor([1.0]))


# ---- the loop ----------------------------------------------------------------------------------

def test_steps_zero_is_off():
    fb = ErrorFeedback(8, steps=0)
    y0 = torch.tensor([3.0, 40.0])
    out = fb(y0, torch.randn(2, 8), torch.randn(11, 8), torch.arange(0.0, 101.0, 10.0))
    assert torch.equal(out.ages, y0[:, None])
    assert torch.equal(out.uncertainty, torch.zeros(2, 1))
    assert feedback_loss(out, torch.tensor([1.0, 2.0])) == {}


def test_untrained_loop_is_identity_with_positive_uncertainty():
    fb = ErrorFeedback(8, steps=3, hidden_dim=16, age_scale=10.0)
    y0 = torch.tensor([3.0, 40.0, 99.5])
    out = fb(y0, torch.randn(3, 8), torch.randn(101, 8), torch.arange(101.0))
    assert out.ages.shape == (3, 4) and out.uncertainty.shape == (3, 4)
    assert torch.equal(out.ages, y0[:, None].expand(3, 4))
    assert (out.uncertainty > 0).all()   # softplus of the rating, never zero


def test_loop_adds_residuals_and_uncertainty_is_nonnegative():
    torch.manual_seed(0)
    fb = ErrorFeedback(8, steps=2, hidden_dim=16)
    randomise_head(fb)
    f, T, ages = torch.randn(64, 8), torch.randn(101, 8), torch.arange(101.0)
    y0 = torch.rand(64) * 100
    out = fb(y0, f, T, ages)
    assert (out.uncertainty >= 0).all()
    # Each step is y_{r+1} = y_r + r_hat(y_r): recompute step by step through the public step().
    y = y0
    for r in range(2):
        residual, u = fb.step(y, f, T, ages)
        torch.testing.assert_close(out.uncertainty[:, r], u)
        y = y + residual
        torch.testing.assert_close(out.ages[:, r + 1], y)
    assert not torch.allclose(out.ages[:, 1], y0)
    # steps can be changed at inference: the head is shared.
    assert fb(y0, f, T, ages, steps=4).ages.shape == (64, 5)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_inverse_controls_the_gradient_through_the_inverse_map(detach):
    torch.manual_seed(0)
    fb = ErrorFeedback(8, steps=1, hidden_dim=16, detach_inverse=detach)
    randomise_head(fb)
    y0 = torch.tensor([12.4, 55.7], requires_grad=True)
    out = fb(y0, torch.randn(2, 8), torch.randn(101, 8), torch.arange(101.0))
    out.ages[:, 1].sum().backward()
    if detach:  # only through y1 = y0 + r_hat: d y1 / d y0 == 1 exactly
        assert torch.equal(y0.grad, torch.ones(2))
    else:       # plus the path through t_hat = interp(T, y0)
        assert (y0.grad - 1).abs().min() > 1e-4


def test_feedback_loss_hand_computed_and_uncertainty_target_detached():
    ages = torch.tensor([[10.0, 12.0, 11.0], [30.0, 27.0, 29.5]], requires_grad=True)
    unc = torch.tensor([[1.0, 0.5, 0.0], [2.0, 1.0, 1.0]], requires_grad=True)
    y = torch.tensor([11.0, 29.0])
    parts = feedback_loss(FeedbackOutput(ages, unc), y, uncertainty_loss="l1")
    # errors: [[1, 1, 0], [1, 2, 0.5]]; steps 1..R: (1 + 0 + 2 + 0.5) / 4
    assert parts["feedback"].item() == pytest.approx(3.5 / 4)
    # |u - err|: [[0, 0.5, 0], [1, 1, 0.5]] -> 3 / 6
    assert parts["uncertainty"].item() == pytest.approx(0.5)
    parts["uncertainty"].backward()
    assert ages.grad is None or torch.equal(ages.grad, torch.zeros_like(ages))
    assert unc.grad.abs().sum() > 0


# ---- the controlled problem --------------------------------------------------------------------

def _controlled_batch(n, gen, u, v):
    """Base estimate y0 = y + b(f) + s(f) * noise: a learnable bias and a learnable error size."""
    E = u.numel()
    f = F.normalize(torch.randn(n, E, generator=gen), dim=1)
    y = torch.rand(n, generator=gen) * 100
    bias = 8 * torch.tanh(3 * f @ u)                     # systematic, up to +-8 years
    size = 0.2 + 6 * torch.sigmoid(12 * f @ v)           # error spread, 0.2 .. 6.2 years
    return f, y, y + bias + size * torch.randn(n, generator=gen)


def _train_controlled(steps, detach=True, iters=300):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    E = 16
    u = F.normalize(torch.randn(E, generator=gen), dim=0)
    v = F.normalize(torch.randn(E, generator=gen), dim=0)
    T = F.normalize(torch.randn(101, E, generator=gen), dim=1)
    ages = torch.arange(101.0)
    fb = ErrorFeedback(E, steps=steps, hidden_dim=64, detach_inverse=detach)
    opt = torch.optim.Adam(fb.parameters(), lr=3e-3)
    for _ in range(iters):
        f, y, y0 = _controlled_batch(256, gen, u, v)
        parts = feedback_loss(fb(y0, f, T, ages), y)
        opt.zero_grad()
        sum(parts.values()).backward()
        opt.step()
    f, y, y0 = _controlled_batch(2000, torch.Generator().manual_seed(1), u, v)  # held out
    with torch.no_grad():
        out = fb(y0, f, T, ages)
    return out, y


@pytest.fixture
def one_thread():
    """300 steps of tiny tensors: extra threads only add synchronisation (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_feedback_corrects_a_learnable_bias_and_its_uncertainty_ranks_the_error(one_thread):
    off, y = _train_controlled(steps=0, iters=0)
    on, y_on = _train_controlled(steps=2)
    assert torch.equal(y, y_on)                           # same held-out data
    mae_off = (off.ages[:, -1] - y).abs().mean().item()
    err = (on.ages - y[:, None]).abs()                    # (n, 3)
    mae = err.mean(0)
    # The base error is ~4.7 years; the noise floor E|s(f) noise| is ~2.5.
    assert mae_off > 4.0
    assert mae[-1] < 0.65 * mae_off
    assert mae[1] < mae[0]
    # The reported uncertainty of the final estimate ranks its actual error (oracle s(f): ~0.70).
    assert spearman(on.uncertainty[:, -1], err[:, -1]) > 0.3
    assert spearman(on.uncertainty[:, 0], err[:, 0]) > 0.3


def test_loop_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    fb = ErrorFeedback(8, steps=2, hidden_dim=16)
    randomise_head(fb)
    args = (torch.tensor([12.3, 67.8]), torch.randn(2, 8), torch.randn(101, 8), torch.arange(101.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fb(*args)
    plain = fb(*args)
    assert mixed.ages.dtype == torch.float32
    torch.testing.assert_close(mixed.ages, plain.ages)
    torch.testing.assert_close(mixed.uncertainty, plain.uncertainty)


# ---- the hypothesis-conditioned re-reading (the default design) --------------------------------

def test_reread_untrained_is_identity_and_steps_zero_is_off():
    fb = HypothesisFeedback(8, 6, steps=2, hidden_dim=16, heads=2).eval()
    y0 = torch.tensor([3.0, 40.0, 99.5])
    out = fb(y0, torch.randn(3, 8), torch.randn(101, 8), torch.arange(101.0), torch.randn(3, 5, 6))
    assert torch.equal(out.ages, y0[:, None].expand(3, 3)) and (out.uncertainty > 0).all()
    off = fb(y0, torch.randn(3, 8), torch.randn(101, 8), torch.arange(101.0), torch.randn(3, 5, 6), steps=0)
    assert torch.equal(off.ages, y0[:, None]) and feedback_loss(off, y0) == {}


def test_reread_head_senses_the_hypothesis_and_trains_on_perturbed_ones():
    torch.manual_seed(0)
    fb = HypothesisFeedback(8, 6, steps=1, hidden_dim=16, heads=2, noise=5.0)
    with torch.no_grad():
        fb.correction[-1].weight.normal_(0, 0.3)
    f, T, ages, tokens = torch.randn(1, 8).expand(5, 8), torch.randn(101, 8), torch.arange(101.0), torch.randn(1, 4, 6)
    y = torch.tensor([10.0, 30.0, 50.0, 70.0, 90.0])   # one image at five hypotheses
    fb.eval()
    out = fb(y, f, T, ages, tokens.expand(5, 4, 6))
    assert (out.ages[:, 1] - y).std() > 1e-3          # the correction depends on the hypothesis
    assert out.rated is not None and torch.equal(out.rated[:, 0], y)
    fb.train()
    noisy = fb(y, f, T, ages, tokens.expand(5, 4, 6))
    assert (noisy.rated[:, 0] - y).abs().min() > 0    # training rates and corrects perturbed estimates
    y0 = y.clone().requires_grad_(True)
    fb(y0, f, T, ages, tokens.expand(5, 4, 6)).ages[:, 1].sum().backward()
    assert y0.grad is None or torch.equal(y0.grad, torch.zeros(5))   # the feedback never trains the base


@pytest.mark.parametrize("loss", ["laplace", "l1"])
def test_uncertainty_loss_sends_no_gradient_into_the_fused_embedding(loss):
    torch.manual_seed(0)
    fb = HypothesisFeedback(8, 6, steps=2, hidden_dim=16, heads=2)
    with torch.no_grad():
        fb.correction[-1].weight.normal_(0, 0.3)
    f = torch.randn(4, 8, requires_grad=True)
    tokens = torch.randn(4, 5, 6, requires_grad=True)
    out = fb(torch.rand(4) * 100, f, torch.randn(101, 8), torch.arange(101.0), tokens)
    parts = feedback_loss(out, torch.rand(4) * 100, uncertainty_loss=loss)
    parts["uncertainty"].backward(retain_graph=True)
    assert f.grad is None and tokens.grad is None
    assert fb.rating[1].weight.grad.abs().sum() > 0 and fb.query[0].weight.grad is None
    parts["feedback"].backward()
    assert f.grad.abs().sum() > 0 and tokens.grad.abs().sum() > 0


def test_laplace_uncertainty_loss_hand_computed():
    out = FeedbackOutput(ages=torch.tensor([[10.0, 12.0]]), uncertainty=torch.tensor([[2.0, 0.05]]),
                         rated=torch.tensor([[11.0, 12.0]]))
    parts = feedback_loss(out, torch.tensor([14.0]), uncertainty_loss="laplace", min_uncertainty=0.1)
    # errors of the rated estimates: 3 and 2; scales 2 and 0.1 (floored): (3/2 + log 2 + 2/0.1 + log 0.1) / 2
    want = (1.5 + math.log(2.0) + 20.0 + math.log(0.1)) / 2
    assert parts["uncertainty"].item() == pytest.approx(want, rel=1e-6)
    assert parts["feedback"].item() == pytest.approx(2.0)   # |12 - 14|, steps 1..R of the ages


def _saturating_problem(n, gen):
    """y uniform on 0..100, visible in f (and in tokens that hold f): a base that saturates at 25..75
    cannot follow it, so at its L1 optimum it is biased at both ends."""
    y = torch.rand(n, generator=gen) * 100
    z = (y - 50) / 50
    f = torch.cat([z[:, None], 0.1 * torch.randn(n, 7, generator=gen)], dim=1)
    tokens = torch.stack([f, f.flip(1), -f], dim=1)  # (n, 3, 8)
    return f, tokens, y


def test_reread_feedback_corrects_a_biased_base_that_is_trained_with_it(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    T, ages = F.normalize(torch.randn(101, 8, generator=gen), dim=1), torch.arange(101.0)
    base = torch.nn.Linear(8, 1)
    fb = HypothesisFeedback(8, 8, steps=2, hidden_dim=64, heads=4, noise=10.0)
    opt = torch.optim.Adam([*base.parameters(), *fb.parameters()], lr=3e-3)
    for _ in range(400):
        f, tokens, y = _saturating_problem(256, gen)
        y0 = 50 + 25 * torch.tanh(base(f).squeeze(1))           # the biased base, trained by its own L1
        parts = feedback_loss(fb(y0, f, T, ages, tokens), y)
        opt.zero_grad()
        ((y0 - y).abs().mean() + parts["feedback"] + parts["uncertainty"]).backward()
        opt.step()
    fb.eval()
    f, tokens, y = _saturating_problem(2000, torch.Generator().manual_seed(1))   # held out
    with torch.no_grad():
        y0 = 50 + 25 * torch.tanh(base(f).squeeze(1))
        out = fb(y0, f, T, ages, tokens)
    err = (out.ages - y[:, None]).abs()
    mae = err.mean(0)
    assert mae[0] > 5.0                                      # the trained base is still biased (optimum 6.25)
    assert mae[-1] < 0.5 * mae[0] and mae[1] < mae[0]
    assert spearman(out.uncertainty[:, 0], err[:, 0]) > 0.3   # it knows which estimates are off


def test_training_also_rates_the_clean_chain_and_the_uncertainty_loss_averages_both():
    torch.manual_seed(0)
    fb = HypothesisFeedback(8, 6, steps=2, hidden_dim=16, heads=2, noise=5.0)
    with torch.no_grad():
        fb.correction[-1].weight.normal_(0, 0.3)
    f, T, ages, tokens = torch.randn(4, 8), torch.randn(101, 8), torch.arange(101.0), torch.randn(4, 5, 6)
    y0, y = torch.tensor([20.0, 35.0, 50.0, 80.0]), torch.tensor([25.0, 30.0, 60.0, 70.0])
    clean = fb.eval()(y0, f, T, ages, tokens)
    assert clean.clean_rated is None and clean.clean_uncertainty is None   # evaluation runs one chain
    out = fb.train()(y0, f, T, ages, tokens)
    torch.testing.assert_close(out.clean_rated, clean.ages)          # the evaluation chain: no noise
    torch.testing.assert_close(out.clean_uncertainty, clean.uncertainty)
    assert (out.rated - out.clean_rated).abs().min() > 0             # the other chain is perturbed
    # l1 by hand: |u - |y - rated|| averaged over images and steps, on each chain, then the mean of the two
    perturbed = (out.uncertainty - (out.rated - y[:, None]).abs()).abs().mean()
    unperturbed = (clean.uncertainty - (clean.ages - y[:, None]).abs()).abs().mean()
    parts = feedback_loss(out, y, uncertainty_loss="l1")
    assert parts["uncertainty"].item() == pytest.approx(float((perturbed + unperturbed).detach()) / 2, rel=1e-5)
    parts["uncertainty"].backward()
    assert fb.query[0].weight.grad is None    # neither chain's rating reaches the query


@pytest.mark.parametrize("detach", [True, False])
def test_residual_uncertainty_loss_moves_neither_f_nor_the_head_nor_y0(detach):
    torch.manual_seed(0)
    fb = ErrorFeedback(8, steps=2, hidden_dim=16, detach_inverse=detach)
    randomise_head(fb)
    f = torch.randn(4, 8, requires_grad=True)
    y0 = (torch.rand(4) * 100).requires_grad_(True)
    parts = feedback_loss(fb(y0, f, torch.randn(101, 8), torch.arange(101.0)), torch.rand(4) * 100)
    parts["uncertainty"].backward(retain_graph=True)
    assert f.grad is None and y0.grad is None and all(p.grad is None for p in fb.head.parameters())
    assert fb.rating[0].weight.grad.abs().sum() > 0
    parts["feedback"].backward()   # the correction itself still trains f and reaches y0
    assert f.grad.abs().sum() > 0 and y0.grad.abs().sum() > 0


def test_query_without_text_ignores_the_text_embeddings():
    f, ages, tokens = torch.randn(3, 8), torch.arange(101.0), torch.randn(3, 5, 6)
    y0 = torch.tensor([12.0, 47.0, 80.0])
    T1, T2 = torch.randn(101, 8), torch.randn(101, 8)
    for text in (True, False):
        torch.manual_seed(0)
        fb = HypothesisFeedback(8, 6, steps=1, hidden_dim=16, heads=2, text=text).eval()
        with torch.no_grad():
            fb.correction[-1].weight.normal_(0, 0.3)
        a, b = fb(y0, f, T1, ages, tokens), fb(y0, f, T2, ages, tokens)
        assert torch.equal(a.ages, b.ages) != text and torch.equal(a.uncertainty, b.uncertainty) != text
    assert fb.query[0].in_features == 8 + 13   # f and the encoding of y (1 + 2 * 6 frequencies) only


def test_anchored_query_reads_the_anchor_embedding_and_its_zero_shot_estimate():
    torch.manual_seed(0)
    fb = HypothesisFeedback(8, 6, steps=1, hidden_dim=16, heads=2, anchored=True).eval()
    with torch.no_grad():
        fb.correction[-1].weight.normal_(0, 0.3)
    args = (torch.tensor([12.0, 47.0]), torch.randn(2, 8), torch.randn(101, 8), torch.arange(101.0),
            torch.randn(2, 5, 6))
    a, y_zs = F.normalize(torch.randn(2, 8), dim=-1), torch.tensor([20.0, 60.0])
    with pytest.raises(ValueError, match="anchor"):
        fb(*args)
    base = fb(*args, anchor=(a, y_zs)).ages
    assert not torch.allclose(fb(*args, anchor=(-a, y_zs)).ages, base)
    assert not torch.allclose(fb(*args, anchor=(a, y_zs + 30)).ages, base)
    assert fb.query[0].in_features == (3 * 8 + 13) + (2 * 8 + 13)   # reread's inputs + [a, a * t_hat, enc(y_zs)]
