"""Reversible age estimation with error feedback (CILF-CIAE, abstract claim 4;
README.md#reversible-estimation).

The abstract says a "reversible age estimation" module uses end-to-end error feedback to correct the
age prediction and to tell the model how good that prediction is. Two readings, selectable
(CILFConfig.feedback_design; "anchored" extends the second), measured side by side in the ablation
(bench/README.md#ablation):

"reread" (HypothesisFeedback, the default): every step re-reads the evidence conditioned on the
hypothesis, as iterative error feedback for pose estimation and RAFT do:

    query_r = MLP([f, t_hat_r, f * t_hat_r, enc(y_r)]) + step_r      t_hat_r = interp(T, y_r)
    read_r  = attention(query_r over the fused image tokens)
    r_hat_r = MLP([query_r, read_r]);  y_{r+1} = y_r + r_hat_r
    u_r     = MLP([query_r, read_r, r_hat_r] detached)              rating never moves the estimate

trained on perturbed hypotheses: y_r enters as stop_grad(y_r) + noise, with target y - y_r, so the head
learns a correction field around the truth rather than a constant; the base estimate y0 keeps its own
loss (the feedback loss never reaches it). The rating is trained on those perturbed hypotheses and, in
the same step, on the clean chain that evaluation runs (no noise; its corrections take no loss), so u is
also fitted to the estimates it rates at evaluation. Without the text (text=False) the query reads
[f, enc(y_r)] only: the control for whether the age texts matter.

"anchored" (HypothesisFeedback with anchored=True): the query also reads a frozen copy of the pretrained
CLIP image tower's embedding a (evidence the fine-tuned f may have lost) and that tower's zero-shot
estimate y_zs, as [a, a * t_hat_r, enc(y_zs)] appended to the reread query's inputs.

"residual" (ErrorFeedback, the first reading, kept for the comparison); it cannot correct (the head
never sees one image at two hypotheses, see README.md#reversible-estimation):

    inverse map    t_hat_r = interp(T, y_r)                   predicted age -> language space
    error head     r_hat_r = head(x_r),  x_r = [f, t_hat_r, f * t_hat_r, f - t_hat_r]
    correction     y_{r+1} = y_r + r_hat_r                     r = 0 .. R-1
    uncertainty    u_r = rating([x_r, r_hat_r] detached) ~ |y - y_r|   rating never moves f, y0 or the head

One head is shared by all steps (a loop, so R can be changed at inference); it is evaluated R+1 times
so that the final estimate y_R gets its own uncertainty u_R. R = 0 switches the module off: the
estimate stays y0 and the uncertainty is zero.

The module needs only a predicted age, an image embedding and age-text embeddings, so it can sit on
top of any age estimator. Imports nothing but torch.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["interpolate_age_embedding", "ErrorFeedback", "HypothesisFeedback", "FeedbackOutput", "feedback_loss",
           "UNCERTAINTY_LOSSES"]

UNCERTAINTY_LOSSES = ("laplace", "l1")


def interpolate_age_embedding(text_emb, ages, y):
    """Embedding of a (possibly fractional) age by linear interpolation between its neighbours.

    text_emb (K, E): one embedding per age; ages (K,): ascending; y (B,): ages to map.
    Returns (B, E). Exact at each a_k, piecewise linear (hence differentiable almost everywhere) in y,
    and clamped to [a_1, a_K] (zero gradient in y outside the range). Ages need not be evenly spaced.
    """
    if text_emb.dim() != 2 or ages.dim() != 1 or text_emb.shape[0] != ages.shape[0]:
        raise ValueError(f"interpolate_age_embedding: need text_emb (K, E) and ages (K,), got "
                         f"{tuple(text_emb.shape)} and {tuple(ages.shape)}")
    ages = ages.to(device=y.device, dtype=y.dtype)
    if ages.numel() == 1:
        return text_emb.expand(y.shape[0], -1)
    y = y.clamp(ages[0], ages[-1])
    # Left neighbour index; the last interval is closed so y == a_K stays inside [a_{K-1}, a_K].
    lo = (torch.searchsorted(ages, y.detach().contiguous(), right=True) - 1).clamp(0, ages.numel() - 2)
    w = ((y - ages[lo]) / (ages[lo + 1] - ages[lo])).unsqueeze(1)  # (B, 1), in [0, 1]
    w = w.to(text_emb.dtype)
    # (1 - w) * e_lo + w * e_hi: at w = 0 or 1 one term is exactly zero, so whole ages are exact.
    return (1 - w) * text_emb[lo] + w * text_emb[lo + 1]  # (B, E)


@dataclass
class FeedbackOutput:
    """ages (B, R+1): [y0, y1, ..., yR]; uncertainty (B, R+1): predicted |y - y_r| (>= 0; zeros if R = 0);
    rated (B, R+1): the estimate each uncertainty rates (None: ages; in training the "reread" design
    rates and corrects perturbed estimates); clean_rated, clean_uncertainty (B, R+1): in training with
    perturbed hypotheses, the estimates of the unperturbed chain (the one evaluation runs) and their
    ratings; None otherwise."""
    ages: torch.Tensor
    uncertainty: torch.Tensor
    rated: Optional[torch.Tensor] = None
    clean_rated: Optional[torch.Tensor] = None
    clean_uncertainty: Optional[torch.Tensor] = None


class ErrorFeedback(nn.Module):
    """R correction steps of an age estimate, each with its predicted error.

    embed_dim: E of the image and text embeddings; steps: R (0 = off); hidden_dim: error-head width;
    age_scale: years per unit of the head's raw outputs (keeps those outputs O(1); the model passes a
    tenth of its age range); detach_inverse: feed y_r.detach() to the inverse map (default, see below).

    detach_inverse: the gradient of t_hat with respect to y is (e_{k+1} - e_k) / (a_{k+1} - a_k), a
    piecewise-constant field that jumps at every whole age. With it, the step losses can lower the error
    by moving y_r to where the head's input is easier rather than by correcting it, and the gradient
    reaching the base model is noisy. Detached, every step corrects a fixed estimate (as iterative
    error feedback in pose and flow estimation does). The correction itself stays on the graph,
    y_{r+1} = y_r + r_hat_r, so the final loss still reaches the base model and f end to end.
    Measured on the controlled problem of tests/test_feedback.py: bench/README.md#what-was-tried.
    """

    def __init__(self, embed_dim, steps=2, hidden_dim=256, age_scale=10.0, detach_inverse=True):
        super().__init__()
        if steps < 0:
            raise ValueError(f"ErrorFeedback: steps must be >= 0, got {steps}")
        self.embed_dim, self.steps, self.age_scale = embed_dim, steps, float(age_scale)
        self.detach_inverse = detach_inverse
        self.head = nn.Sequential(
            nn.Linear(4 * embed_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )
        # The rating reads the head's inputs and output detached: its loss never reaches f, y0 or the head.
        self.rating = nn.Sequential(
            nn.Linear(4 * embed_dim + 1, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )
        # Zero last layer: r_hat = 0 at start, so an untrained module leaves y0 unchanged.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def _features(self, f, t_hat):
        """[f, t, f * t, f - t] of the unit vectors, scaled so every entry is O(1) whatever E is."""
        f, t_hat = F.normalize(f, dim=-1), F.normalize(t_hat, dim=-1)
        s = self.embed_dim ** 0.5
        # f * t keeps its mean (the cosine), which a LayerNorm would remove.
        return torch.cat([f * s, t_hat * s, f * t_hat * self.embed_dim, (f - t_hat) * s], dim=-1)  # (B, 4E)

    def step(self, y, image_emb, text_emb, ages):
        """One evaluation of the head at estimate y: (residual r_hat (B,), uncertainty u (B,) >= 0)."""
        y_in = y.detach() if self.detach_inverse else y
        t_hat = interpolate_age_embedding(text_emb, ages, y_in)  # (B, E)
        features = self._features(image_emb, t_hat)  # (B, 4E)
        residual = self.head(features).squeeze(1)  # (B,), in units of age_scale
        rating_in = torch.cat([features, residual.unsqueeze(1)], dim=1).detach()  # (B, 4E + 1)
        return self.age_scale * residual, self.age_scale * F.softplus(self.rating(rating_in).squeeze(1))

    def forward(self, y0, image_emb, text_emb, ages, steps=None):
        """y0 (B,), image_emb (B, E), text_emb (K, E), ages (K,) -> FeedbackOutput. steps overrides R."""
        steps = self.steps if steps is None else steps
        if steps == 0:
            return FeedbackOutput(ages=y0.unsqueeze(1), uncertainty=torch.zeros_like(y0).unsqueeze(1))
        # float32 with autocast off: ages need more than bfloat16's 8 significant bits.
        with torch.autocast(device_type=y0.device.type, enabled=False):
            image_emb, text_emb, y = image_emb.float(), text_emb.float(), y0.float()
            ys, us = [y], []
            for r in range(steps + 1):
                residual, u = self.step(y, image_emb, text_emb, ages)
                us.append(u)
                if r < steps:  # the last evaluation only rates y_R
                    y = y + residual
                    ys.append(y)
        return FeedbackOutput(ages=torch.stack(ys, 1), uncertainty=torch.stack(us, 1))  # (B, R+1) each


def feedback_loss(out, target, uncertainty_loss="laplace", min_uncertainty=0.1):
    """Named loss terms of one FeedbackOutput against the true ages target (B,).

    "feedback": L1 of every corrected estimate y_1..y_R, averaged over steps (so its weight need not
    change with R; y_0 is supervised by the base model's own loss). "uncertainty": each u_r against the
    actual error e_r = |y - rated_r|, detached so that rating an estimate never moves it: "laplace" (the
    default), the negative log-likelihood of e under a Laplace of scale u, e / u + log u (up to a
    constant; u floored at min_uncertainty years), which weighs errors relative to their predicted size
    and is least where u is the mean of e given the input; "l1", |u - e|, least at the median of e. With
    clean ratings (out.clean_uncertainty), the mean of that term on the perturbed and on the clean chain:
    the perturbed ratings shape the correction's field, the clean ones the u that evaluation reports.
    Returns {} when R = 0.
    """
    if uncertainty_loss not in UNCERTAINTY_LOSSES:
        raise ValueError(f"uncertainty_loss must be one of {UNCERTAINTY_LOSSES}, got {uncertainty_loss!r}")
    if out.ages.shape[1] == 1:
        return {}
    target = target.to(out.ages.dtype).unsqueeze(1)  # (B, 1)
    error = (out.ages - target).abs()  # (B, R+1)

    def rating_loss(uncertainty, rated):
        rated_error = (rated - target).abs().detach()  # (B, R+1)
        if uncertainty_loss == "l1":
            return (uncertainty - rated_error).abs().mean()
        scale = uncertainty.clamp(min=min_uncertainty)
        return (rated_error / scale + scale.log()).mean()

    uncertainty = rating_loss(out.uncertainty, out.ages if out.rated is None else out.rated)
    if out.clean_uncertainty is not None:
        uncertainty = (uncertainty + rating_loss(out.clean_uncertainty, out.clean_rated)) / 2
    return {"feedback": error[:, 1:].mean(), "uncertainty": uncertainty}


class HypothesisFeedback(nn.Module):
    """R correction steps, each re-reading the image tokens at the current hypothesis (see the module
    docstring for the equations), with the predicted error of every estimate.

    embed_dim: E of f and T; token_dim: width of the image tokens it attends over; steps: R (0 = off);
    hidden_dim, heads: width and heads of the query and the attention; age_range: (a_1, a_K), for the
    hypothesis encoding and the output scale (a tenth of the range per unit); noise: the largest std
    (years) of the Gaussian perturbation added to each hypothesis in training, the std drawn per example
    uniformly from [0, noise] (0: none); text: the query reads t_hat_r (False: only f and enc(y_r), the
    no-text control); anchored: the query also reads the frozen pretrained embedding a and its zero-shot
    estimate y_zs (forward's anchor). One head shared by all steps (a loop; a
    step index beyond those trained reuses the last one's embedding), evaluated R+1 times so y_R is rated.
    """

    FREQUENCIES = 6   # sin/cos of the hypothesis at 0.5, 1, 2, .. 16 cycles over the age range

    def __init__(self, embed_dim, token_dim, steps=2, hidden_dim=128, heads=4, age_range=(0.0, 100.0),
                 noise=10.0, text=True, anchored=False):
        super().__init__()
        if steps < 0 or hidden_dim % heads:
            raise ValueError(f"HypothesisFeedback: need steps >= 0 and hidden_dim divisible by heads, got "
                             f"{steps}, {hidden_dim}, {heads}")
        self.embed_dim, self.steps, self.heads, self.noise = embed_dim, steps, heads, float(noise)
        self.text, self.anchored = text, anchored
        self.age_min = float(age_range[0])
        self.age_span = float(age_range[1] - age_range[0]) or 1.0
        self.age_scale = self.age_span / 10
        self.query = nn.Sequential(nn.Linear(self.query_inputs(embed_dim, text, anchored), hidden_dim), nn.GELU(),
                                   nn.Linear(hidden_dim, hidden_dim))
        self.step_embedding = nn.Embedding(steps + 1, hidden_dim)
        self.token_norm = nn.LayerNorm(token_dim)
        self.key, self.value = nn.Linear(token_dim, hidden_dim), nn.Linear(token_dim, hidden_dim)
        self.correction = nn.Sequential(nn.LayerNorm(2 * hidden_dim), nn.Linear(2 * hidden_dim, hidden_dim),
                                        nn.GELU(), nn.Linear(hidden_dim, 1))
        self.rating = nn.Sequential(nn.LayerNorm(2 * hidden_dim + 1), nn.Linear(2 * hidden_dim + 1, hidden_dim),
                                    nn.GELU(), nn.Linear(hidden_dim, 1))
        # Zero last layer: r_hat = 0 at start, so an untrained module leaves y0 unchanged.
        nn.init.zeros_(self.correction[-1].weight)
        nn.init.zeros_(self.correction[-1].bias)

    @classmethod
    def query_inputs(cls, embed_dim, text=True, anchored=False):
        """Width of the query's input: [f, (t_hat, f * t_hat), enc(y)] and, anchored, [a, (a * t_hat), enc(y_zs)]."""
        code = 1 + 2 * cls.FREQUENCIES
        anchor = (2 if text else 1) * embed_dim + code
        return (3 if text else 1) * embed_dim + code + (anchor if anchored else 0)

    def encode_age(self, y):
        """(B,) ages -> (B, 1 + 2 * FREQUENCIES): the position in the range and its sines and cosines."""
        z = ((y - self.age_min) / self.age_span).unsqueeze(1)  # (B, 1), 0..1 over the range
        angles = z * (math.pi * 2.0 ** torch.arange(self.FREQUENCIES, device=y.device, dtype=y.dtype))
        return torch.cat([z, angles.sin(), angles.cos()], dim=1)

    def step(self, y, step_index, image_emb, text_emb, ages, keys, values, anchor=None):
        """One evaluation at hypothesis y (B,), treated as a constant: (r_hat (B,), u (B,) >= 0)."""
        y = y.detach()
        f = F.normalize(image_emb, dim=-1)
        s = self.embed_dim ** 0.5
        inputs = [f * s]
        if self.text:
            t_hat = F.normalize(interpolate_age_embedding(text_emb, ages, y), dim=-1)  # (B, E)
            inputs += [t_hat * s, f * t_hat * self.embed_dim]
        inputs.append(self.encode_age(y))
        if anchor is not None:   # the frozen pretrained evidence, read like f and y
            a, y_zs = anchor
            inputs += [a * s] + ([a * t_hat * self.embed_dim] if self.text else []) + [self.encode_age(y_zs)]
        hypothesis = torch.cat(inputs, dim=1)  # (B, query_inputs)
        index = torch.full_like(y, min(step_index, self.steps), dtype=torch.long)
        query = self.query(hypothesis) + self.step_embedding(index)  # (B, h)
        B, h = query.shape
        q = query.view(B, self.heads, 1, h // self.heads)  # keys, values: (B, H, N, h / H)
        read = F.scaled_dot_product_attention(q, keys, values).reshape(B, h)  # (B, h)
        evidence = torch.cat([query, read], dim=1)  # (B, 2h)
        residual = self.age_scale * self.correction(evidence).squeeze(1)
        rating_in = torch.cat([evidence, residual.unsqueeze(1) / self.age_scale], dim=1).detach()
        return residual, self.age_scale * F.softplus(self.rating(rating_in).squeeze(1))

    def forward(self, y0, image_emb, text_emb, ages, tokens, steps=None, anchor=None):
        """y0 (B,), image_emb (B, E), text_emb (K, E), ages (K,), tokens (B, N, D) -> FeedbackOutput.
        anchor: (a (B, E) unit norm, y_zs (B,)), the frozen pretrained evidence; given iff anchored."""
        if (anchor is not None) != self.anchored:
            raise ValueError(f"HypothesisFeedback: anchored={self.anchored} needs anchor "
                             f"{'(a, y_zs)' if self.anchored else 'None'}")
        steps = self.steps if steps is None else steps
        if steps == 0:
            return FeedbackOutput(ages=y0.unsqueeze(1), uncertainty=torch.zeros_like(y0).unsqueeze(1))
        with torch.autocast(device_type=y0.device.type, enabled=False):
            image_emb, text_emb, y = image_emb.float(), text_emb.float(), y0.float()
            if anchor is not None:
                anchor = tuple(x.detach().float() for x in anchor)
            tokens = self.token_norm(tokens.float())
            B, N, _ = tokens.shape
            split = lambda x: x.view(B, N, self.heads, -1).transpose(1, 2)  # (B, H, N, h / H)
            keys, values = split(self.key(tokens)), split(self.value(tokens))
            evaluate = lambda y_in, r: self.step(y_in, r, image_emb, text_emb, ages, keys, values, anchor)
            perturbed = self.training and self.noise > 0
            ys, us, rated = self._chain(y, steps, evaluate, perturbed)
            clean_rated = clean_us = None
            if perturbed:   # the chain evaluation runs, so that u is also fitted to the estimates it rates there
                _, clean_us, clean_rated = self._chain(y, steps, evaluate, perturbed=False)
        return FeedbackOutput(ages=ys, uncertainty=us, rated=rated, clean_rated=clean_rated,
                              clean_uncertainty=clean_us)

    def _chain(self, y, steps, evaluate, perturbed):
        """R corrections from y (B,) and R+1 ratings, evaluate(hypothesis, r) -> (r_hat, u) at each:
        (estimates, ratings, rated hypotheses), each (B, R+1)."""
        ys, us, rated = [y], [], []
        for r in range(steps + 1):
            y_in = y.detach()
            if perturbed:   # a perturbed hypothesis: learn a field, not a constant;
                # its scale drawn per example from [0, noise], so exact and far hypotheses both occur
                y_in = y_in + self.noise * torch.rand_like(y_in) * torch.randn_like(y_in)
            residual, u = evaluate(y_in, r)
            rated.append(y_in)
            us.append(u)
            if r < steps:
                y = y_in + residual
                ys.append(y)
        return torch.stack(ys, 1), torch.stack(us, 1), torch.stack(rated, 1)
