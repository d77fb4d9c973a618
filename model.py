"""The CILF-CIAE age estimator: CLIP features, image-text fusion, age distribution, contrastive
matching and reversible error feedback (the method as implemented: README.md#paper-to-code).

Abstract claim -> code:
1. CLIP puts image features and text semantics in one space: CILFCIAE.clip, text_embeddings(),
   zero_shot() (raw CLIP prompt classification, the paper's v1 framing).
2. A sub-quadratic Transformer does "channel evolution and spatial interaction" and fuses image and
   text: FusionTransformer (token mixer by name from linear_attention, cross-attention from the image
   tokens to the age-text embeddings, MLP), switch CILFConfig.mixer / depth / cross_attention.
3. A contrastive multimodal module supervises the fusion: contrastive_loss with soft targets for
   repeated ages, switch CILFConfig.contrastive_weight.
4. Reversible age estimation with error feedback: feedback.HypothesisFeedback (re-reads the fused image
   tokens at each hypothesis; default; "anchored" also reads a frozen copy of the pretrained image tower,
   CILFCIAE.anchor) or feedback.ErrorFeedback (the first reading), switches CILFConfig.feedback_steps,
   feedback_design, feedback_text, uncertainty_loss.
Control for the language: CILFConfig.text_embeddings "random" puts fixed random unit vectors in place of
the age-text embeddings T everywhere T is read.

    f = normalize(g / |g| + W_out [LN(Z_0) ; LN(mean_n Z_n)])       fused embedding      (B, E)
    s_k = scale * cos(f, T_k);  p = softmax(s);  y0 = sum_k p_k a_k                         (B, K)
    L = KL(N(y, sigma_y^2) over A || p) + l1 |y0 - y| + con L_con + fb mean_r |y_r - y| + unc L_unc
    (sigma: sigma_y, or per image from the spread of its apparent-age votes: CILFConfig.label_sigma)

y0 keeps its own L1 (weight 1) whether the feedback is on or off: the feedback's hypotheses are detached,
so its loss never reaches y0, and without the L1 y0 would be left to the KL term alone (README.md#loss;
the choice on the demo's validation splits: bench/README.md#ablation).

The temperature scale = exp(logit_scale) starts at CLIP's and trains (capped at 100 after each optimizer
step, CILFCIAE.clamp_logit_scale); the reported age y_R is clipped to the class range [a_1, a_K].

The plain baseline on the same backbone, LinearAgeBaseline (train.py --method ce-baseline): CLIP's image
embedding, a linear layer to the K age classes, cross-entropy, the expectation as the age and the
distribution's standard deviation as its uncertainty; CLIPAgeModel holds what both models share (the CLIP
towers' training modes and AdamW groups, the age classes).

W_out starts at zero, so an untrained model is CLIP's prompt classifier (with CLIP's temperature, up
to rounding) followed by a feedback loop that changes nothing; everything switched off (depth 0,
feedback 0, contrastive and L1 weights 0) *is* that classifier trained with the distribution loss.
"""
import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_loader
from feedback import (UNCERTAINTY_LOSSES, ErrorFeedback, FeedbackOutput, HypothesisFeedback, feedback_loss,
                      interpolate_age_embedding)
from linear_attention import MIXERS, LinearAttention, build_token_mixer

__all__ = ["AgeClasses", "CILFConfig", "CLIPAgeModel", "CILFCIAE", "LinearBaselineConfig", "LinearAgeBaseline",
           "MODELS", "AgeOutput", "FusionTransformer", "contrastive_loss", "check_prompts_fit", "weight_shapes",
           "config_problem", "MAX_AGE_CLASSES", "MAX_FEEDBACK_STEPS", "FEEDBACK_DESIGNS", "TEXT_EMBEDDINGS",
           "soft_contrastive_targets", "gaussian_label_distribution", "label_sigmas", "MIN_LABEL_SIGMA",
           "weight_decayed"]

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's own cap on its temperature
MAX_AGE_CLASSES = 1201  # a class every 0.1 year from 0 to 120
# Far more correction steps than any useful run (the method's default is 2); each is one more pass of the
# feedback per image at every prediction, and a step count read from a shared file must not loop for hours.
MAX_FEEDBACK_STEPS = 64
# The narrowest per-image label distribution (years). An apparent-age std of 0 or 0.5 (few raters who agreed)
# would make the target one class (at sigma 0.5 the neighbouring classes get e^-2 of the centre's weight),
# which is the one-hot target the label distribution is there to avoid; nobody judges an apparent age to
# better than about a year, and at sigma 1 each neighbour keeps e^-1/2 of the centre's weight.
MIN_LABEL_SIGMA = 1.0
FEEDBACK_DESIGNS = ("reread", "anchored", "residual")
TEXT_EMBEDDINGS = ("clip", "random")
RANDOM_TEXT_SEED = 0   # the generator of text_embeddings "random" (saved in the state dict all the same)


@dataclass
class AgeClasses:
    """The age classes a_1..a_K of a model: min_age, min_age + age_step, ..., max_age."""
    min_age: float = 0.0                    # first age class a_1
    max_age: float = 100.0                  # last age class a_K
    age_step: float = 1.0                   # spacing of the age classes

    def num_ages(self) -> int:
        """K, the number of age classes; at most MAX_AGE_CLASSES (each class is a prompt the text tower reads)."""
        if not self.age_step > 0 or not self.max_age >= self.min_age:
            raise ValueError(f"{type(self).__name__}: need age_step > 0 and max_age >= min_age, got "
                             f"{self.min_age}..{self.max_age} step {self.age_step}")
        n = (self.max_age - self.min_age) / self.age_step
        if not n < MAX_AGE_CLASSES:
            raise ValueError(f"{type(self).__name__}: {self.min_age:g}..{self.max_age:g} in steps of "
                             f"{self.age_step:g} makes more than {MAX_AGE_CLASSES} age classes")
        return int(math.floor(n + 1e-6)) + 1

    def ages(self) -> torch.Tensor:
        """The age classes a_1..a_K as a float32 tensor (K,)."""
        return self.min_age + self.age_step * torch.arange(self.num_ages(), dtype=torch.float64).float()


@dataclass
class CILFConfig(AgeClasses):
    # prompts (the age classes: AgeClasses)
    prompt_template: str = "a photo of a {} year old person."  # one prompt per age class
    # fusion Transformer (claim 2)
    mixer: str = "linear"                   # token mixer: linear | fourier | softmax | none (global token only)
    depth: int = 2                          # fusion blocks; 0 = no fusion at all, f = normalize(g)
    width: int = 256                        # fusion width d
    heads: int = 4                          # attention heads (linear/softmax mixers and cross-attention)
    mlp_ratio: float = 4.0                  # MLP hidden size = mlp_ratio * d
    dropout: float = 0.0                    # dropout on every residual branch of the fusion
    cross_attention: bool = True            # tokens attend to the age-text embeddings (image-text fusion)
    text_embeddings: str = "clip"           # T: clip (the prompts' embeddings) | random (fixed random unit
                                            # vectors of the same shape, everywhere T is read: a control)
    # reversible error feedback (claim 4)
    feedback_steps: int = 2                 # correction steps R; 0 = module off
    feedback_hidden: int = 256              # width of the error head
    feedback_design: str = "reread"         # reread: feedback.HypothesisFeedback | anchored: reread that also
                                            # reads the frozen pretrained image tower | residual: ErrorFeedback
    feedback_text: bool = True              # reread/anchored: the query reads t_hat (False: f and enc(y) only)
    feedback_noise: float = 10.0            # reread: std (years) of the training perturbation of hypotheses
    detach_inverse: bool = True             # residual: inverse map reads y_r.detach() (see feedback.ErrorFeedback)
    uncertainty_loss: str = "laplace"       # laplace (NLL) | l1 (|u - err|), see feedback.feedback_loss;
                                            # chosen on the demo's validation splits (bench/README.md#ablation)
    # CLIP towers (claim 1)
    freeze_image_tower: bool = False        # True: no gradient to clip.visual, kept in eval mode
    freeze_text_tower: bool = True          # True: prompts encoded once and cached, tower in eval mode
    clip_bn: str = "frozen"                 # BatchNorm of a trained ResNet tower: frozen (eval mode) | train
    # loss (README.md#loss); a part whose weight is 0 is not computed
    sigma_y: float = 2.0                    # std (years) of the Gaussian label distribution
    label_sigma: str = "fixed"              # fixed: sigma_y for every image | age-std: each image's apparent-age
                                            # std where the data gives one (label_sigmas), sigma_y elsewhere
    distribution_weight: float = 1.0        # KL(label distribution || p)
    l1_weight: float = 1.0                  # |y0 - y|: the base estimate's own L1
    contrastive_weight: float = 1.0         # soft-target image-text matching (claim 3)
    contrastive_sigma: float = 2.0          # std (years) of the soft contrastive targets
    feedback_weight: float = 1.0            # mean over steps r >= 1 of |y_r - y|
    uncertainty_weight: float = 1.0         # uncertainty loss of every step (u_r against |y - y_r|)

    def prompts(self):
        """One prompt per age class, e.g. "a photo of a 25 year old person."."""
        return [self.prompt_template.format(f"{a:g}") for a in self.ages().tolist()]


@dataclass
class AgeOutput:
    """Everything the model says about a batch of B images over K age classes and R feedback steps."""
    logits: torch.Tensor                    # (B, K) scale * cos(f, T)
    probs: torch.Tensor                     # (B, K) age distribution p
    ages_per_step: torch.Tensor             # (B, R+1) [y0, y1, .., yR], unclipped (the losses read these)
    age: torch.Tensor                       # (B,) final prediction y_R clipped to [a_1, a_K]
    uncertainty: torch.Tensor               # (B,) predicted |y - y_R|; zeros when R = 0
    embedding: torch.Tensor                 # (B, E) fused embedding f, unit norm
    uncertainty_per_step: torch.Tensor      # (B, R+1) predicted |y - y_r|
    text_embeddings: Optional[torch.Tensor]  # (K, E) the unit-norm age-text embeddings T used; None: no prompts
    rated_per_step: Optional[torch.Tensor] = None  # (B, R+1) estimates rated (perturbed in training), or None
    clean_rated_per_step: Optional[torch.Tensor] = None        # (B, R+1) training: the unperturbed chain's
    clean_uncertainty_per_step: Optional[torch.Tensor] = None  # estimates and their ratings; else None


def check_prompts_fit(config: CILFConfig, context_length: int):
    """Raise ValueError when an age prompt of config is longer than a CLIP text context of context_length
    tokens (its start and end tokens included), naming the longest prompt and both lengths."""
    prompts = config.prompts()
    lengths = [clip_loader.token_count(prompt) for prompt in prompts]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    if lengths[longest] > context_length:
        raise ValueError(f"the prompt {prompts[longest][:60]!r}{'...' if len(prompts[longest]) > 60 else ''} is "
                         f"{lengths[longest]} tokens long, more than the CLIP's context of {context_length} tokens")


def config_problem(config: AgeClasses, age_limit: float):
    """(field, why) for the first rule across a model config's fields that config breaks, or None: the age
    classes lie in [0, age_limit] with min_age < max_age, and a CILFConfig's fusion width splits evenly into
    its heads. The one statement of these rules: train.py applies it to its options, eval.py to the model
    config in a checkpoint (before anything is built from it)."""
    if not 0 <= config.min_age < config.max_age <= age_limit:
        return "max_age", (f"need 0 <= min_age < max_age <= {age_limit:g}, not min_age {config.min_age:g} and "
                           f"max_age {config.max_age:g}")
    if isinstance(config, CILFConfig) and config.width % config.heads:
        return "heads", f"must divide the fusion width {config.width}, not {config.heads}"
    return None


def weight_shapes(config: AgeClasses, embed_dim: int) -> dict:
    """{state-dict key: shape} of the tensors that config's sizes fix, for a CLIP of embedding width
    embed_dim: the age classes, the fusion's width, depth and MLP, the feedback's steps and width (for a
    LinearBaselineConfig: the age classes and its head). A
    checkpoint whose weights differ states sizes it does not have; comparing these first refuses it before a
    model of the stated sizes is built (a stated width of 20000 would cost gigabytes before any other check)."""
    c = config
    shapes = {"ages": (c.num_ages(),)}
    if isinstance(c, LinearBaselineConfig):   # the ce-baseline: one linear head on CLIP's image embedding
        return {**shapes, "head.weight": (c.num_ages(), embed_dim)}
    if c.depth > 0:
        shapes["fusion.in_proj.weight"] = (c.width, embed_dim)
        shapes[f"fusion.blocks.{c.depth - 1}.mlp.0.weight"] = (int(round(c.mlp_ratio * c.width)), c.width)
    if c.text_embeddings == "random":
        shapes["random_text"] = (c.num_ages(), embed_dim)
    if c.feedback_steps > 0 and c.feedback_design in ("reread", "anchored"):
        shapes["feedback.step_embedding.weight"] = (c.feedback_steps + 1, c.feedback_hidden)
        shapes["feedback.query.0.weight"] = (c.feedback_hidden, HypothesisFeedback.query_inputs(
            embed_dim, c.feedback_text, c.feedback_design == "anchored"))
    elif c.feedback_steps > 0:
        shapes["feedback.head.0.weight"] = (c.feedback_hidden, 4 * embed_dim)
        shapes["feedback.rating.0.weight"] = (c.feedback_hidden, 4 * embed_dim + 1)
    return shapes


def random_unit_vectors(count, dim, seed):
    """(count, dim) unit vectors drawn from a Gaussian by a generator seeded with seed (the global RNG is not
    touched): uniform on the sphere, the stand-in for T in the text_embeddings "random" control."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, dim, generator=generator), dim=-1)


def gaussian_label_distribution(target, ages, sigma):
    """Discretised N(y, sigma^2) over the age classes: (B,) -> (B, K), rows sum to 1. sigma: one number for
    every image, or a (B,) tensor, one per image (label_sigmas: > 0 by construction; not checked here, as
    reading it would cost the training step a wait for the device)."""
    if not torch.is_tensor(sigma) and sigma <= 0:
        raise ValueError(f"sigma_y must be > 0, got {sigma}")
    sigma = sigma[:, None] if torch.is_tensor(sigma) else sigma  # (B, 1) or a number
    logq = -(ages[None, :] - target[:, None]) ** 2 / (2 * sigma ** 2)  # (B, K)
    return logq.softmax(dim=1)


def label_sigmas(age_std, sigma_y):
    """The label distribution's sigma per image (B,) from the spread of its apparent-age votes age_std (B,),
    nan where the data gives none: max(age_std, MIN_LABEL_SIGMA), and sigma_y where it is nan."""
    return torch.where(age_std.isnan(), torch.full_like(age_std, sigma_y), age_std.clamp(min=MIN_LABEL_SIGMA))


def soft_contrastive_targets(y, sigma):
    """q_ij proportional to exp(-(y_i - y_j)^2 / (2 sigma^2)), rows normalised: (B,) -> (B, B)."""
    if sigma <= 0:
        raise ValueError(f"contrastive_sigma must be > 0, got {sigma}")
    return (-(y[:, None] - y[None, :]) ** 2 / (2 * sigma ** 2)).softmax(dim=1)


def contrastive_loss(image_emb, text_emb, ages, y, logit_scale, sigma):
    """Soft-target symmetric image-text matching between f_i and the true-age texts t_{y_j} of the batch.

    image_emb (B, E), text_emb (K, E) for the classes ages (K,), y (B,) true ages, logit_scale the
    multiplier (not its log). Ages repeat inside a batch, so the one-hot InfoNCE target would call a
    same-age pair a negative; q (soft_contrastive_targets) replaces it. q itself is not symmetric (each
    row is normalised by its own sum), but its row j is the target of text j too: text j stands for age
    y_j, the kernel exp(-(y_i - y_j)^2 / 2 sigma^2) is symmetric in i and j, so text j's target over the
    images i is that kernel normalised over i, which is row j of q.
    """
    t = F.normalize(interpolate_age_embedding(text_emb, ages, y), dim=-1)  # (B, E) t_{y_j}
    sim = logit_scale * F.normalize(image_emb, dim=-1) @ t.t()  # (B, B) image i vs text j
    q = soft_contrastive_targets(y, sigma)  # (B, B)
    image_to_text = -(q * sim.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(q * sim.t().log_softmax(dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


class FusionBlock(nn.Module):
    """Pre-norm block: token mixing ("spatial interaction"), cross-attention to text, MLP ("channel evolution")."""

    def __init__(self, dim, heads, mlp_ratio, dropout, mixer, grid_size, cross_attention):
        super().__init__()
        self.mix_norm = nn.LayerNorm(dim) if mixer != "none" else None
        self.mix = build_token_mixer(mixer, dim, heads, grid_size, num_global_tokens=1) if mixer != "none" else None
        self.cross_norm = nn.LayerNorm(dim) if cross_attention else None
        self.cross = LinearAttention(dim, heads) if cross_attention else None
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(round(mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, z, text, grid_size):
        """z (B, 1+N, d); text (B, K, d) or None; grid_size (h, w) of the N image tokens."""
        if self.mix is not None:
            z = z + self.drop(self.mix(self.mix_norm(z), grid_size=grid_size))
        if self.cross is not None:
            z = z + self.drop(self.cross(self.cross_norm(z), context=text))
        return z + self.drop(self.mlp(self.mlp_norm(z)))


class FusionTransformer(nn.Module):
    """Fuses CLIP's global embedding, its image tokens and the age-text embeddings into f (README.md#fusion).

    Z0 = [LN(g); LN(P)] W_in + position; depth FusionBlocks; readout from the global token and the
    mean image token (the Fourier mixer lets the global token bypass its filter, so without the mean
    its spatial mixing could not reach f); f = normalize(g/|g| + W_out readout), W_out zero at start.
    mixer "none" uses the global token only: the image tokens are never read.
    """

    def __init__(self, embed_dim, config: CILFConfig, grid_size):
        super().__init__()
        d = config.width
        self.use_tokens = config.mixer != "none"
        self.grid_size = tuple(grid_size)
        self.in_norm = nn.LayerNorm(embed_dim)  # pretrained CLIP features are not unit scale
        self.in_proj = nn.Linear(embed_dim, d)
        self.global_embedding = nn.Parameter(torch.zeros(1, 1, d))
        if self.use_tokens:
            # Learned (d, h, w) grid, resampled bicubically for other grid sizes, as CLIP does.
            self.position_embedding = nn.Parameter(0.02 * torch.randn(1, d, *self.grid_size))
            self.pool_norm = nn.LayerNorm(d)
        self.text_proj = nn.Linear(embed_dim, d) if config.cross_attention else None
        self.blocks = nn.ModuleList(
            FusionBlock(d, config.heads, config.mlp_ratio, config.dropout, config.mixer, self.grid_size,
                        config.cross_attention) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(2 * d if self.use_tokens else d, embed_dim)
        nn.init.zeros_(self.out_proj.weight)  # f = normalize(g) until trained
        nn.init.zeros_(self.out_proj.bias)

    def _positions(self, grid_size):
        pos = self.position_embedding
        if tuple(grid_size) != self.grid_size:
            pos = F.interpolate(pos, size=tuple(grid_size), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)  # (1, h*w, d)

    def forward(self, g, tokens, grid_size, text):
        """g (B, E), tokens (B, N, E) with N = h*w (ignored for mixer "none"), text (K, E) ->
        (f (B, E), the fused tokens (B, 1+N, d), or (B, 1, d) for mixer "none")."""
        z = self.in_proj(self.in_norm(g)).unsqueeze(1) + self.global_embedding  # (B, 1, d)
        if self.use_tokens:
            p = self.in_proj(self.in_norm(tokens)) + self._positions(grid_size)  # (B, N, d)
            z = torch.cat([z, p], dim=1)  # (B, 1+N, d)
        context = None
        if self.text_proj is not None:
            context = self.text_proj(text.to(z.dtype)).unsqueeze(0).expand(z.shape[0], -1, -1)  # (B, K, d)
        for block in self.blocks:
            z = block(z, context, grid_size)
        readout = self.out_norm(z[:, 0])  # (B, d)
        if self.use_tokens:
            readout = torch.cat([readout, self.pool_norm(z[:, 1:].mean(dim=1))], dim=1)  # (B, 2d)
        residual = self.out_proj(readout).float()  # (B, E)
        return F.normalize(F.normalize(g.float(), dim=-1) + residual, dim=-1), z


def weight_decayed(name, param):
    """AdamW's decay rule: no decay on norms, biases, embeddings (token, position, class, global), the
    temperature and the Fourier filter: every parameter with fewer than 2 dimensions, "embedding" in its
    name, or the filter's complex_weight (it starts at the identity, 1; decay would pull it toward 0,
    toward deleting the branch)."""
    return param.ndim >= 2 and "embedding" not in name and not name.endswith("complex_weight")


@contextlib.contextmanager
def full_float32_matmuls():
    """float32 matmuls in full precision inside (no TF32, whatever torch.set_float32_matmul_precision says
    outside); the setting outside is restored after."""
    outside = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(outside)


def _base_grid(visual):
    """Token grid (h, w) of the visual tower at its built resolution (OpenAI's module names)."""
    res = visual.input_resolution
    stride = 32 if hasattr(visual, "attnpool") else visual.conv1.kernel_size[0]
    return res // stride, res // stride


def _drop_text_cache(module, incompatible_keys):
    """load_state_dict post-hook (a module-level function, so the model stays picklable)."""
    module._text_cache = None


class CLIPAgeModel(nn.Module):
    """What every age model here shares: a CLIP (self.clip) whose towers train or stay frozen as the config
    says (freeze_image_tower, freeze_text_tower, clip_bn), the age classes (self.ages), the towers' train
    and eval modes, and the AdamW parameter groups. A subclass builds its own modules after __init__, then
    calls set_trainable()."""

    def __init__(self, clip_model, config):
        super().__init__()
        if config.clip_bn not in ("frozen", "train"):
            raise ValueError(f"{type(config).__name__}.clip_bn must be 'frozen' or 'train', got {config.clip_bn!r}")
        self.config = config
        self.clip = clip_model
        self.register_buffer("ages", config.ages())  # (K,), saved: a checkpoint names its classes

    def set_trainable(self):
        """requires_grad of the CLIP towers as the config says; CLIP's own temperature never trains."""
        for p in self._image_params():
            p.requires_grad_(not self.config.freeze_image_tower)
        for p in self._text_params():
            p.requires_grad_(not self.config.freeze_text_tower)
        self.clip.logit_scale.requires_grad_(False)  # only zero_shot() reads it; our losses never do
        self.train(self.training)

    # ---- CLIP towers -------------------------------------------------------------------------
    def _image_params(self):
        return list(self.clip.visual.parameters())

    def _text_params(self):
        # Everything of CLIP outside the visual tower except its temperature: token and position
        # embeddings, the text Transformer, ln_final, text_projection.
        return [p for n, p in self.clip.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]

    def train(self, mode: bool = True):
        """As nn.Module.train, but frozen towers stay in eval mode (no dropout, no BatchNorm drift), and so
        do the BatchNorm layers of a trained ResNet tower unless clip_bn is "train": their running
        statistics would otherwise move at momentum 0.1 whatever the tower's small learning rate, away
        from the pretrained ones (and per process under DDP). Their affine weights still train."""
        super().train(mode)
        if self.config.freeze_image_tower:
            self.clip.visual.eval()
        elif self.config.clip_bn == "frozen":
            for module in self.clip.visual.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if self.config.freeze_text_tower:
            for name, child in self.clip.named_children():
                if name != "visual":
                    child.eval()
        return self

    # ---- training ----------------------------------------------------------------------------
    def param_groups(self, clip_lr, new_lr, weight_decay):
        """AdamW groups: CLIP towers at clip_lr, new modules at new_lr; each with and without weight decay.

        Weight decay as weight_decayed says. Frozen parameters are left out; empty groups are dropped.
        """
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = "clip" if name.startswith("clip.") else "new"
            decay = weight_decayed(name, p)
            key = f"{part}_{'decay' if decay else 'no_decay'}"
            if key not in groups:
                groups[key] = {"name": key, "params": [], "lr": clip_lr if part == "clip" else new_lr,
                               "weight_decay": weight_decay if decay else 0.0}
            groups[key]["params"].append(p)
        return list(groups.values())


class CILFCIAE(CLIPAgeModel):
    """CLIP + fusion + age distribution + error feedback; see the module docstring for the equations."""

    def __init__(self, clip_model, config: Optional[CILFConfig] = None):
        config = CILFConfig() if config is None else config
        if config.mixer not in MIXERS + ("none",):
            raise ValueError(f"CILFConfig.mixer must be one of {MIXERS + ('none',)}, got {config.mixer!r}")
        if config.feedback_steps < 0 or config.depth < 0:
            raise ValueError("CILFConfig: feedback_steps and depth must be >= 0")
        if config.text_embeddings not in TEXT_EMBEDDINGS:
            raise ValueError(f"CILFConfig.text_embeddings must be one of {TEXT_EMBEDDINGS}, got "
                             f"{config.text_embeddings!r}")
        super().__init__(clip_model, config)
        E = clip_model.embed_dim
        tokens = clip_loader.tokenize(config.prompts(), context_length=clip_model.context_length)
        self.register_buffer("prompt_tokens", tokens, persistent=False)  # (K, L)
        self._text_cache = None
        self.register_load_state_dict_post_hook(_drop_text_cache)  # new weights, new text embeddings
        if config.text_embeddings == "random":   # saved, so a rebuilt model reads the same vectors
            self.register_buffer("random_text", random_unit_vectors(len(self.ages), E, RANDOM_TEXT_SEED))
        # The frozen pretrained image tower the anchored feedback reads: copied before any training step,
        # never trained (no gradient, left out of the optimizer, always in eval mode), saved with the model.
        anchored = config.feedback_steps > 0 and config.feedback_design == "anchored"
        self.anchor = copy.deepcopy(clip_model.visual).requires_grad_(False) if anchored else None

        self.fusion = FusionTransformer(E, config, _base_grid(clip_model.visual)) if config.depth > 0 else None
        # A temperature of our own, starting at CLIP's: it trains even with both towers frozen, and
        # zero_shot() keeps CLIP's value untouched. Its cap is enforced by clamp_logit_scale() after each
        # optimizer step, as open_clip does, not by a clamp in forward: every released CLIP sits at the cap
        # (in float32 just above log 100), where such a clamp passes a gradient of exactly 0.
        start = min(float(clip_model.logit_scale.detach()), MAX_LOGIT_SCALE)
        self.logit_scale = nn.Parameter(torch.tensor(start))
        self.feedback = self._build_feedback(E) if config.feedback_steps > 0 else None
        self.set_trainable()

    def _build_feedback(self, E):
        c = self.config
        if c.uncertainty_loss not in UNCERTAINTY_LOSSES:
            raise ValueError(f"CILFConfig.uncertainty_loss must be one of {UNCERTAINTY_LOSSES}, got "
                             f"{c.uncertainty_loss!r}")
        span = float(self.ages[-1] - self.ages[0]) or 1.0
        if c.feedback_design not in FEEDBACK_DESIGNS:
            raise ValueError(f"CILFConfig.feedback_design must be one of {FEEDBACK_DESIGNS}, got "
                             f"{c.feedback_design!r}")
        if c.feedback_design == "residual":
            if not c.feedback_text:
                raise ValueError("CILFConfig.feedback_text False needs feedback_design reread or anchored "
                                 "(the residual design reads nothing but f and t_hat)")
            return ErrorFeedback(E, c.feedback_steps, c.feedback_hidden, age_scale=span / 10,
                                 detach_inverse=c.detach_inverse)
        # it attends over the fused tokens (width d), or over f alone (width E) without fusion
        token_dim = c.width if self.fusion is not None else E
        return HypothesisFeedback(E, token_dim, c.feedback_steps, c.feedback_hidden,
                                  age_range=(float(self.ages[0]), float(self.ages[-1])), noise=c.feedback_noise,
                                  text=c.feedback_text, anchored=c.feedback_design == "anchored")

    # ---- age prompts -------------------------------------------------------------------------
    def _encode_prompts(self):
        # float32 whatever the caller's autocast, and full float32 matmuls whatever the TF32 setting:
        # adjacent age prompts differ by ~1e-4 per coordinate, which bf16 (8 significant bits) rounds away,
        # making neighbouring ages identical, and which TF32's 11 bits come close to.
        with torch.autocast(device_type=self.prompt_tokens.device.type, enabled=False), full_float32_matmuls():
            return F.normalize(self.clip.encode_text(self.prompt_tokens).float(), dim=-1)  # (K, E)

    def text_embeddings(self):
        """The age-text embeddings T (K, E) the model reads: its prompts' (prompt_embeddings), or with
        text_embeddings "random" the fixed random unit vectors saved with it."""
        if self.config.text_embeddings == "random":
            return self.random_text
        return self.prompt_embeddings()

    def prompt_embeddings(self):
        """Unit-norm embeddings of the age prompts (K, E) by CLIP's text tower, computed in float32.

        Frozen text tower: encoded once and cached (not saved in the state dict; dropped on
        load_state_dict and on a change of device). Trained text tower: encoded at every call, on the graph.
        """
        if not self.config.freeze_text_tower:
            return self._encode_prompts()
        device = self.prompt_tokens.device
        if self._text_cache is None or self._text_cache.device != device:
            with torch.no_grad():
                self._text_cache = self._encode_prompts()
        return self._text_cache

    def temperature(self):
        """The multiplier exp(logit_scale) of the age logits and the contrastive loss."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self):
        """Keep the temperature at or below CLIP's cap, 100: call after every optimizer step."""
        self.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, images):
        """images (B, 3, R, R), CLIP-normalised, any resolution the backbone accepts -> AgeOutput."""
        text = self.text_embeddings()  # (K, E)
        if self.fusion is None:
            f = F.normalize(self.clip.encode_image(images).float(), dim=-1)  # (B, E)
            fused = f.unsqueeze(1)  # (B, 1, E)
        else:
            g, tokens, grid = self.clip.encode_image_tokens(images)  # (B, E), (B, N, E), (h, w)
            f, fused = self.fusion(g, tokens, grid, text)  # (B, E), (B, 1+N, d)
        anchor = self._anchor_embedding(images) if self.anchor is not None else None
        return self._predict(f, text, self.temperature(), self.feedback, fused, anchor)

    def zero_shot(self, images):
        """Raw CLIP prompt classification: softmax(CLIP's logit_scale * cos(g, T)) with T the prompts'
        embeddings (whatever text_embeddings says); no fusion, no feedback."""
        text = self.prompt_embeddings()
        f = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        return self._predict(f, text, self.clip.logit_scale.exp(), None)

    @torch.no_grad()
    def _anchor_embedding(self, images):
        """The frozen pretrained tower's unit-norm embedding a (B, E) of the images."""
        return F.normalize(self.anchor(images.to(self.clip.dtype)).float(), dim=-1)

    def train(self, mode: bool = True):
        """As CLIPAgeModel.train; the anchored feedback's frozen tower stays in eval mode."""
        super().train(mode)
        if self.anchor is not None:
            self.anchor.eval()
        return self

    def _predict(self, f, text, scale, feedback, fused=None, anchor=None):
        # float32 with autocast off: neighbouring age prompts differ in cosine by ~1e-3, below bf16's
        # resolution, and the ages need more than bf16's 8 significant bits.
        with torch.autocast(device_type=f.device.type, enabled=False):
            f, text = f.float(), text.float()
            logits = scale.float() * f @ text.t()  # (B, K)
            probs = logits.softmax(dim=1)
            y0 = probs @ self.ages  # (B,)
            if feedback is None:
                fb = FeedbackOutput(ages=y0.unsqueeze(1), uncertainty=torch.zeros_like(y0).unsqueeze(1))
            elif isinstance(feedback, HypothesisFeedback) and anchor is not None:
                # the pretrained tower's zero-shot estimate, with CLIP's own temperature: evidence, no gradient
                y_zs = (self.clip.logit_scale.exp().float() * anchor @ text.detach().t()).softmax(dim=1) @ self.ages
                fb = feedback(y0, f, text, self.ages, fused, anchor=(anchor, y_zs))
            elif isinstance(feedback, HypothesisFeedback):
                fb = feedback(y0, f, text, self.ages, fused)
            else:
                fb = feedback(y0, f, text, self.ages)
        uncertainty = fb.uncertainty[:, -1]
        # The corrections may step outside the classes; an age the classes do not cover is not predicted.
        age = fb.ages[:, -1].clamp(self.ages[0], self.ages[-1])  # (B,)
        return AgeOutput(logits=logits, probs=probs, ages_per_step=fb.ages, age=age,
                         uncertainty=uncertainty, embedding=f, uncertainty_per_step=fb.uncertainty,
                         text_embeddings=text, rated_per_step=fb.rated, clean_rated_per_step=fb.clean_rated,
                         clean_uncertainty_per_step=fb.clean_uncertainty)

    # ---- training ----------------------------------------------------------------------------
    def loss(self, out: AgeOutput, target, gather=None, age_std=None):
        """(total, parts) for true ages target (B,): the weighted sum and each unweighted named part.

        Parts: distribution (KL), l1 (on y0), contrastive, feedback, uncertainty; a part whose weight is
        zero (or whose module is off) is neither computed nor listed. gather: None, or a function that maps
        this process's (B, ...) tensor to the (N B, ...) tensor of all N processes, keeping the gradient of
        the local part (train.GatherFromProcesses.apply): the contrastive loss then compares every image of the
        global batch with every text, as one process with the whole batch does; the other parts are means
        over images, which DDP's mean of the gradients makes global. age_std: None, or (B,) the spread of
        each image's apparent-age votes, nan where unknown: with config.label_sigma "age-std" the label
        distribution's sigma per image (label_sigmas); without it (or "fixed") sigma_y for every image.
        """
        c = self.config
        weights = {"distribution": c.distribution_weight, "l1": c.l1_weight, "contrastive": c.contrastive_weight,
                   "feedback": c.feedback_weight, "uncertainty": c.uncertainty_weight}
        y = target.to(device=out.logits.device, dtype=torch.float32)
        parts = {}
        with torch.autocast(device_type=y.device.type, enabled=False):
            if weights["distribution"]:
                per_image = age_std is not None and c.label_sigma == "age-std"
                sigma = label_sigmas(age_std.to(y), c.sigma_y) if per_image else c.sigma_y  # (B,) or a number
                label = gaussian_label_distribution(y, self.ages, sigma)  # (B, K)
                parts["distribution"] = F.kl_div(out.logits.log_softmax(dim=1), label, reduction="batchmean")
            if weights["l1"]:
                parts["l1"] = (out.ages_per_step[:, 0] - y).abs().mean()
            if weights["contrastive"]:
                embedding, ages = (out.embedding, y) if gather is None else (gather(out.embedding), gather(y))
                parts["contrastive"] = contrastive_loss(embedding, out.text_embeddings, self.ages, ages,
                                                        self.temperature(), c.contrastive_sigma)
            fb = feedback_loss(FeedbackOutput(out.ages_per_step, out.uncertainty_per_step, out.rated_per_step,
                                              out.clean_rated_per_step, out.clean_uncertainty_per_step), y,
                               c.uncertainty_loss)
            parts.update({k: v for k, v in fb.items() if weights[k]})
        total = sum((weights[k] * v for k, v in parts.items()), out.logits.new_zeros(()))
        return total, parts


# ----------------------------------------------------------------------------- the plain baseline

@dataclass
class LinearBaselineConfig(AgeClasses):
    """LinearAgeBaseline's settings (the age classes: AgeClasses). Its text tower is never read, so it
    stays frozen and in eval mode."""
    freeze_image_tower: bool = False        # True: a linear probe on frozen CLIP features
    clip_bn: str = "frozen"                 # BatchNorm of a trained ResNet tower: frozen (eval mode) | train
    freeze_text_tower: bool = True          # never read by the head; kept so the checkpoint holds a whole CLIP


def age_class_targets(y, ages):
    """Cross-entropy targets over the age classes ages (K,), evenly spaced, for true ages y (B,) -> (B, K):
    an age on a class is that class (one-hot); one between two classes is split between them in proportion
    to its nearness, so the target's expectation is y (apparent ages are means of votes); ages outside
    the classes go to the nearest end."""
    K = len(ages)
    step = float(ages[1] - ages[0]) if K > 1 else 1.0
    position = ((y - ages[0]) / step).clamp(0, K - 1)  # (B,) in class units
    low = position.floor().long().clamp(max=K - 1)
    high = (low + 1).clamp(max=K - 1)
    w = position - low  # (B,) the share of the upper class
    q = torch.zeros(len(y), K, dtype=torch.float32, device=y.device)
    q.scatter_add_(1, low[:, None], (1 - w)[:, None])
    return q.scatter_add_(1, high[:, None], w[:, None])


class LinearAgeBaseline(CLIPAgeModel):
    """The CLIP image tower with a linear head over the K age classes, trained by cross-entropy: the plain
    baseline on the same backbone (train.py --method ce-baseline; Paplham and Franc, CVPR 2024, found it
    hard to beat). p = softmax(W g + b) for CLIP's image embedding g; the age is the expectation
    sum_k p_k a_k; the uncertainty is the standard deviation of p, the spread the model itself predicts
    (it is not trained to rank the error, which CILF-CIAE's feedback is). W and b start at zero: the
    untrained model predicts the mean of the classes."""

    def __init__(self, clip_model, config: Optional[LinearBaselineConfig] = None):
        config = LinearBaselineConfig() if config is None else config
        super().__init__(clip_model, config)
        self.head = nn.Linear(clip_model.embed_dim, len(self.ages))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.set_trainable()

    def forward(self, images):
        """images (B, 3, R, R), CLIP-normalised -> AgeOutput with one step (no feedback) and no prompts."""
        g = self.clip.encode_image(images)  # (B, E)
        # float32 with autocast off, as CILFCIAE._predict: the ages need more than bf16's 8 significant bits
        with torch.autocast(device_type=g.device.type, enabled=False):
            logits = self.head(g.float())  # (B, K)
            probs = logits.softmax(dim=1)
            age = probs @ self.ages  # (B,)
            spread = (probs * (self.ages[None, :] - age[:, None]) ** 2).sum(1).clamp(min=0).sqrt()  # (B,)
        return AgeOutput(logits=logits, probs=probs, ages_per_step=age.unsqueeze(1),
                         age=age.clamp(self.ages[0], self.ages[-1]), uncertainty=spread,
                         embedding=F.normalize(g.float(), dim=-1), uncertainty_per_step=spread.unsqueeze(1),
                         text_embeddings=None)

    def loss(self, out: AgeOutput, target, gather=None, age_std=None):
        """(total, {"cross_entropy": total}): the mean over the batch of -sum_k q_k log p_k, with q the
        targets of age_class_targets (one-hot for whole ages). gather: unused (no loss compares images
        across the batch; CILFCIAE.loss's contrastive part does). age_std: unused (the plain baseline's
        targets stay the benchmark's plain cross-entropy; spreading them by the votes would make it a
        label-distribution method)."""
        y = target.to(device=out.logits.device, dtype=torch.float32)
        with torch.autocast(device_type=y.device.type, enabled=False):
            q = age_class_targets(y, self.ages)
            total = -(q * out.logits.float().log_softmax(dim=1)).sum(1).mean()
        return total, {"cross_entropy": total}

    def clamp_logit_scale(self):
        """No temperature of its own (the head's scale is free): nothing to cap after an optimizer step."""


# The methods train.py --method names: the model class and its config class (eval.model_from_checkpoint
# rebuilds a run's model from the method its checkpoint records).
MODELS = {"cilf-ciae": (CILFCIAE, CILFConfig), "ce-baseline": (LinearAgeBaseline, LinearBaselineConfig)}
