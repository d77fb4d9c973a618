"""CLIP, read from the checkpoint files researchers already have: model, loader, tokenizer, preprocessing.

CILF-CIAE stands on CLIP: the image tower gives every face a global embedding and a grid of location
tokens in the joint space, the text tower embeds the age prompts ("a photo of a 37 year old person.").
This file rebuilds OpenAI's CLIP (ViT and ModifiedResNet towers) with the exact state-dict key names
of OpenAI's checkpoints, so one `build_model(state_dict)` reads RN50 ... ViT-L/14@336px and
open_clip's copies of those weights, and gives the same numbers as OpenAI's own code. `load` also
reads Hugging Face CLIPModel folders and open_clip's other CLIPs (GELU, wider heads, other MLP
ratios, non-square images), taking what no weight file tells from the config file beside it.

What differs from OpenAI's clip package, on purpose:
- checkpoints are data, never code: OpenAI's TorchScript archives are read by a restricted reader of
  their pickle and tensor records (no torch.jit.load unless the caller opts in), other files with
  torch.load(weights_only=True), .safetensors by hand; official file names are SHA-256 verified;
- a hostile file is refused cleanly: one CheckpointError, in bounded time and memory, never a crash
  (pickle opcodes, zip records, tensor views and safetensors headers are checked first);
- weights stay float32 (half precision comes from autocast at run time: OpenAI's fp16 weights fail
  on CPU and turn to NaN under Adam); attention is torch's scaled_dot_product_attention;
- `encode_image_tokens` returns every image location in the joint space, and the models run at
  input resolutions other than the built one (positional embeddings resampled bicubically);
- 16-bit and float PIL images are scaled to 8 bits instead of clipped (see `to_rgb`);
- no silent guess: a file nothing describes loads with a warning naming the assumed architecture,
  and families this CLIP cannot run (SigLIP, CoCa, CLIPA, EVA, timm towers, other vocabularies)
  are refused by name.

Contents, in two halves (the numbered banners in the file):
CLIP as OpenAI wrote it (openai/CLIP's model.py, simple_tokenizer.py and clip.py, in that order)
  1. The model: QuickGELU, ACTIVATIONS, run_blocks (gradient checkpointing), the towers, CLIPConfig, CLIP
  2. Building a model from a state dict: unservable_family, infer_config, build_model, SETTINGS
  3. The tokenizer, byte-level BPE step by step: SimpleTokenizer, default_bpe
  4. Image preprocessing: to_rgb, check_normalisation, image_transform, CLIP_MEAN, CLIP_STD
  5. load and tokenize: load, tokenize, token_count, CheckpointError, error_line
Files you did not write
  6. Hugging Face and open_clip files: is_hf_layout, from_hf_state_dict, hf_settings, hf_stated,
     open_clip_settings; the config files beside the weights (checked against them), the folders
  7. Reading checkpoint files as data: read_state_dict (.safetensors by hand, TorchScript archives
     without torch.jit.load, a sharded Hugging Face model)
  8. Hostile checkpoint files: scan_pickle (pickle opcodes), zip records, tensor views, safe_torch_load
  9. SHA-256 verification: OPENAI_SHA256, verify_checkpoint, sha256

Typical use (`import clip_loader as clip`):
    model, preprocess = clip.load("ViT-B-16.pt")           # or a Hugging Face folder, open_clip file
    logits_per_image, _ = model(preprocess(image)[None], clip.tokenize(["a photo of a 30 year old person."]))
"""
import contextlib
import gzip
import hashlib
import html
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import sys
import warnings
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

__all__ = ["CLIP", "CLIPConfig", "ACTIVATIONS", "run_blocks", "SETTINGS", "infer_config", "unservable_family",
           "build_model", "SimpleTokenizer", "default_bpe", "image_transform", "to_rgb", "check_normalisation",
           "CLIP_MEAN", "CLIP_STD",
           "load", "tokenize", "token_count",
           "CheckpointError", "error_line", "is_hf_layout", "from_hf_state_dict", "hf_settings", "hf_stated",
           "open_clip_settings",
           "read_state_dict", "scan_pickle", "safe_torch_load", "verify_checkpoint", "sha256", "OPENAI_SHA256"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ==== Part one: CLIP as OpenAI wrote it (openai/CLIP's model.py, simple_tokenizer.py, clip.py) ====


# ---- 1. The model (OpenAI's model.py) ----


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained with; its weights need it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The MLP activations CLIP weights were trained with. Nothing in a weight file tells them apart, and
# the wrong one changes every feature: OpenAI's (and open_clip's "-quickgelu" / "openai" / metaclip /
# dfn) weights need QuickGELU, most of open_clip's LAION/DataComp weights need the exact GELU.
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def resample_positional_embedding(pos: torch.Tensor, grid: Tuple[int, int],
                                  base: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(1 + gh*gw, C) embedding of the base grid (gh, gw) (square by default) -> (1 + h*w, C) for an
    h x w grid.

    The first row (class / pooled token) is kept; the grid part is resized bicubically with
    antialiasing, as open_clip's resize_pos_embed does.
    """
    if base is None:
        g = math.isqrt(pos.shape[0] - 1)
        base = (g, g)
    if tuple(base) == tuple(grid):
        return pos
    cls, cells = pos[:1], pos[1:]
    cells = cells.reshape(1, base[0], base[1], -1).permute(0, 3, 1, 2).float()  # (1, C, gh, gw)
    cells = F.interpolate(cells, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
    cells = cells.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)  # (h*w, C)
    return torch.cat([cls, cells])


@contextlib.contextmanager
def _running_statistics_kept(module: nn.Module):
    """BatchNorm layers in module leave their running statistics as they are (momentum 0, the batch count
    put back): the recomputation of a checkpointed block must not update them a second time."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, kept):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """blocks applied in order. With checkpointing (while gradients are recorded) each block keeps only its
    input for backward and recomputes its activations there (non-reentrant torch.utils.checkpoint): the
    same gradients for about one more forward pass of compute (CLIP.set_grad_checkpointing)."""
    if not (checkpointing and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False,
                       context_fn=lambda block=block: (contextlib.nullcontext(), _running_statistics_kept(block)))
    return x


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, H, N, C/H)


class Bottleneck(nn.Module):
    """ResNet bottleneck; a stride is an average pool before conv3 (anti-aliasing), never a strided conv."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # key names "-1", "0", "1" are OpenAI's (the pool has no weights, so "-1" never appears)
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """The ResNet's last pooling: one query (the mean cell) attends over all cells, QKV attention."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"{num_heads} attention heads cannot split the pooled width {embed_dim}")
        self.grid = spacial_dim
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor, return_tokens: bool = False):
        """(B, C, h, w) -> pooled (B, E); with return_tokens also (B, h*w, E): each cell (plus its
        positional embedding, as the pool sees it) through the value and output projections."""
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1 + h*w, C)
        x = x + resample_positional_embedding(self.positional_embedding, (h, w))
        q = _split_heads(self.q_proj(x[:, :1]), self.num_heads)  # (B, H, 1, C/H)
        k = _split_heads(self.k_proj(x), self.num_heads)  # (B, H, 1 + h*w, C/H)
        v = self.v_proj(x)  # (B, 1 + h*w, C)
        pooled = F.scaled_dot_product_attention(q, k, _split_heads(v, self.num_heads))  # (B, H, 1, C/H)
        pooled = self.c_proj(pooled.transpose(1, 2).reshape(b, c))  # (B, E)
        if not return_tokens:
            return pooled
        return pooled, self.c_proj(v[:, 1:])  # (B, E), (B, h*w, E)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a 3-conv stem with an average pool, anti-aliased strides, attention pooling."""

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, input_resolution: int = 224,
                 width: int = 64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.image_size = (input_resolution, input_resolution)
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width  # grows as layers are made
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)
        self.grad_checkpointing = False  # checkpoint each Bottleneck of layer1..layer4 (run_blocks)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> last-stage feature map (B, 32 * width, R/32, R/32)."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = run_blocks(stage, x, self.grad_checkpointing)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.features(x))  # (B, E)

    def forward_tokens(self, x: torch.Tensor):
        feats = self.features(x)
        pooled, tokens = self.attnpool(feats, return_tokens=True)
        return pooled, tokens, tuple(feats.shape[-2:])


class MultiheadSelfAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names (so OpenAI's state dicts load),
    computed batch-first by scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3C)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, C/H)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, N, C/H)
        return self.out_proj(x.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block. causal=True is the text tower's mask: OpenAI's additive
    triu(-inf) mask, whose every bottom-right square slice is again causal. OpenAI's blocks have an
    MLP of 4 x d_model, QuickGELU and LayerNorm eps 1e-5; other CLIPs change all three."""

    def __init__(self, d_model: int, n_head: int, causal: bool = False, mlp_width: Optional[int] = None,
                 activation: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        mlp_width = mlp_width or 4 * d_model
        self.causal = causal
        self.attn = MultiheadSelfAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)),
            ("gelu", ACTIVATIONS[activation]()),
            ("c_proj", nn.Linear(mlp_width, d_model)),
        ]))
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks, batch first: (B, N, width) -> (B, N, width)."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False, **block_options):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"{heads} attention heads cannot split a width of {width}")
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal, **block_options)
                                         for _ in range(layers)])
        self.grad_checkpointing = False  # checkpoint each block (run_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.resblocks, x, self.grad_checkpointing)


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class VisionTransformer(nn.Module):
    """ViT image tower: patches + class token, pre-LN transformer, ln_post and a linear projection.

    input_resolution and patch_size are an int (square) or (height, width), as open_clip allows.
    self.input_resolution is the one side the age pipeline crops squares to: the longer side of a
    non-square tower (its positional embeddings are resampled to the square grid)."""

    def __init__(self, input_resolution: Union[int, Tuple[int, int]], patch_size: Union[int, Tuple[int, int]],
                 width: int, layers: int, heads: int, output_dim: int, **block_options):
        super().__init__()
        self.image_size, patch = _pair(input_resolution), _pair(patch_size)
        self.grid_size = (self.image_size[0] // patch[0], self.image_size[1] // patch[1])
        self.input_resolution = max(self.image_size)
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width ** -0.5
        eps = block_options.get("eps", 1e-5)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(math.prod(self.grid_size) + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, layers, heads, **block_options)
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def _encode(self, x: torch.Tensor):
        x = self.conv1(x)  # (B, W, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + h*w, W)
        x = x + resample_positional_embedding(self.positional_embedding, grid, self.grid_size)
        return self.transformer(self.ln_pre(x)), grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._encode(x)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E)

    def forward_tokens(self, x: torch.Tensor):
        x, grid = self._encode(x)
        # the global token is computed exactly as in forward, so it equals encode_image bit for bit
        return self.ln_post(x[:, 0]) @ self.proj, self.ln_post(x[:, 1:]) @ self.proj, grid


@dataclass
class CLIPConfig:
    """The constructor arguments of CLIP. The first ten are OpenAI's, inferred by build_model from a
    state dict's shapes; the rest are what shapes cannot tell, with OpenAI's values as defaults, set
    from a config file beside the weights or by the caller (see load)."""
    embed_dim: int
    image_resolution: Union[int, Tuple[int, int]]  # (height, width) for a non-square ViT
    vision_layers: Union[int, Tuple[int, int, int, int]]  # int: ViT depth; 4 ints: ResNet blocks per stage
    vision_width: int
    vision_patch_size: Optional[Union[int, Tuple[int, int]]]  # None for ResNets
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    activation: str = "quick_gelu"  # the MLP non-linearity of both towers: "quick_gelu" or "gelu"
    vision_head_width: int = 64  # channels per attention head of the image tower (heads = width / this)
    vision_mlp_width: Optional[int] = None  # None: 4 x vision_width
    text_mlp_width: Optional[int] = None  # None: 4 x transformer_width
    vision_ln_eps: float = 1e-5
    text_ln_eps: float = 1e-5
    text_eos_id: Optional[int] = None  # None: text read at the highest id (OpenAI); else at its first occurrence


class CLIP(nn.Module):
    """OpenAI's CLIP with its constructor signature (plus CLIPConfig's later fields); float32 weights;
    batch-first inside. self.config is the CLIPConfig it was built from; self.image_mean/image_std
    the normalisation its weights were trained with (load sets them from a config file)."""

    def __init__(self, embed_dim: int, image_resolution: Union[int, Tuple[int, int]],
                 vision_layers: Union[int, Sequence[int]], vision_width: int,
                 vision_patch_size: Optional[Union[int, Tuple[int, int]]], context_length: int, vocab_size: int,
                 transformer_width: int, transformer_heads: int, transformer_layers: int,
                 activation: str = "quick_gelu", vision_head_width: int = 64, vision_mlp_width: Optional[int] = None,
                 text_mlp_width: Optional[int] = None, vision_ln_eps: float = 1e-5, text_ln_eps: float = 1e-5,
                 text_eos_id: Optional[int] = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.config = CLIPConfig(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                                 context_length, vocab_size, transformer_width, transformer_heads,
                                 transformer_layers, activation, vision_head_width, vision_mlp_width,
                                 text_mlp_width, vision_ln_eps, text_ln_eps, text_eos_id)
        self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.text_eos_id = text_eos_id
        # OpenAI's rule, with heads of vision_head_width channels: width // 64 heads, at least one
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, heads=max(1, vision_width * 32 // vision_head_width),
                                         input_resolution=image_resolution, width=vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            heads=max(1, vision_width // vision_head_width), output_dim=embed_dim,
                                            mlp_width=vision_mlp_width, activation=activation, eps=vision_ln_eps)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True,
                                       mlp_width=text_mlp_width, activation=activation, eps=text_ln_eps)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width, eps=text_ln_eps)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature, log scale
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation, so a random CLIP (the demo's) trains sensibly."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)  # each residual branch starts as the identity
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def set_grad_checkpointing(self, enabled: bool = True):
        """Gradient checkpointing of both towers' residual blocks (the ViT's and the text tower's
        transformer blocks, the ResNet's bottlenecks; run_blocks): in training each block keeps only its
        input for backward and recomputes the rest there. Same gradients, less activation memory, about
        one more forward pass of compute."""
        image_blocks = self.visual if isinstance(self.visual, ModifiedResNet) else self.visual.transformer
        image_blocks.grad_checkpointing = enabled
        self.transformer.grad_checkpointing = enabled

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> (B, E), not normalised."""
        return self.visual(image.to(self.dtype))

    def encode_image_tokens(self, image: torch.Tensor):
        """(B, 3, R, R) -> (g (B, E) == encode_image(image), tokens (B, h*w, E), grid (h, w)).

        ViT: patch tokens through ln_post and proj. ResNet: last-stage cells through the attention
        pool's value and output projections (the dense-feature recipe of MaskCLIP)."""
        return self.visual.forward_tokens(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(K, L) token ids -> (K, E), read at each row's end-of-text token: its highest id (OpenAI,
        open_clip), or with text_eos_id set, the first position holding that id (0 if none), which is
        what Hugging Face's CLIPTextTransformer does when its config's eos_token_id is not 2."""
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]  # (K, L, W)
        x = self.transformer(x)
        end = text.argmax(dim=-1) if self.text_eos_id is None else (text == self.text_eos_id).int().argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), end]  # (K, W)
        return self.ln_final(x) @ self.text_projection  # (K, E)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (B, K)
        return logits_per_image, logits_per_image.t()


# ---- 2. Building a model from a state dict (model.py's build_model) ----

# tensors some checkpoints carry that are not weights: cached masks, JIT archives' metadata scalars
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
OPENAI_VOCAB_SIZE = 49408  # what SimpleTokenizer serves; other vocabularies need other tokenizers
# CLIPConfig fields no state dict can tell (its shapes tell the rest): build_model's keyword settings
SETTINGS = ("image_resolution", "transformer_heads", "activation", "vision_head_width", "vision_ln_eps",
            "text_ln_eps", "text_eos_id")


def _count(state_dict: dict, prefix: str, depth: int) -> int:
    """Number of distinct indices at key position `depth` among keys starting with prefix."""
    return len({k.split(".")[depth] for k in state_dict if k.startswith(prefix)})


def unservable_family(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The model family of a state dict this CLIP cannot run (its keys say which), else None."""
    keys = set(state_dict)
    vocab = state_dict.get("token_embedding.weight")
    if vocab is not None and vocab.shape[0] != OPENAI_VOCAB_SIZE:
        return (f"a CLIP with a vocabulary of {vocab.shape[0]} tokens, not OpenAI's {OPENAI_VOCAB_SIZE:,} (trained with "
                "another tokenizer: multilingual, BERT, SentencePiece), which this project's BPE tokenizer cannot serve")
    has = lambda *fragments: any(f in k for k in keys for f in fragments)
    if "logit_bias" in keys:
        return "SigLIP (a sigmoid-loss model: logit_bias, its own text tower and vocabulary)"
    if has("text_decoder.", "visual.attn_pool"):
        return "CoCa (attentional pooler and captioning text decoder)"
    if has(".mlp.w1", ".mlp.w12", ".mlp.w3", "fc1_g", "visual.blocks."):
        return "EVA-CLIP (SwiGLU MLPs, EVA's own image tower)"
    if has("visual.trunk."):
        return "open_clip with a timm image tower (ConvNeXt, EVA02, ViTamin, MobileCLIP, ...)"
    if any(k.startswith("text.") for k in keys):
        return "open_clip CustomTextCLIP (a custom or Hugging Face text tower under 'text.')"
    if has(".ls_1.", ".ls_2."):
        return "open_clip ViT with layer scale (ls_init_value)"
    if has(".ln_inner.", ".ln_attn.", ".head_scale", ".ln_q.", ".ln_k.", ".logit_scale"):
        return "open_clip with custom attention blocks (qk_norm / scaled cosine attention / scale_*)"
    if "visual.proj" in keys and "visual.conv1.weight" in keys and "visual.ln_pre.weight" not in keys:
        return "CLIPA (an image tower without ln_pre, average pooling, a BERT vocabulary)"
    if "text_projection.weight" in keys or "text_projection.bias" in keys:
        return "open_clip with a linear/MLP text projection layer (proj_type / proj_bias)"
    return None


def _mlp_width_unless_4x(c_fc: torch.Tensor, width: int) -> Optional[int]:
    """An MLP's hidden width, None when it is OpenAI's 4 x width (so OpenAI's configs compare equal)."""
    return None if c_fc.shape[0] == 4 * width else c_fc.shape[0]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _setting_problem(name: str, value, state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Why a SETTINGS value cannot be what the weights were trained with (its type, its range, or the widths
    the weights hold), or None. Checked before any model is built: a head width of 0 divides by zero, a NaN
    or negative layer-norm eps gives NaN features, an eos id beyond the vocabulary reads no token."""
    if name == "activation":
        return None if value in ACTIVATIONS else f"must be one of {sorted(ACTIVATIONS)}"
    if name == "image_resolution":
        sides = value if isinstance(value, (list, tuple)) else (value,)
        return None if len(sides) in (1, 2) and all(map(_is_count, sides)) else \
            "must be a positive integer or two (height, width)"
    if name in ("vision_ln_eps", "text_ln_eps"):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) and value > 0 else "must be a finite number > 0"
    if name == "text_eos_id":
        vocab = state_dict["token_embedding.weight"].shape[0] if "token_embedding.weight" in state_dict else 0
        return None if value is None or (isinstance(value, int) and not isinstance(value, bool)
                                         and 0 <= value < vocab) else f"must be None or a token id below {vocab}"
    if not _is_count(value):
        return "must be a positive integer"
    if name == "transformer_heads":  # heads of the text tower
        width = state_dict["ln_final.weight"].shape[0] if "ln_final.weight" in state_dict else value
        return None if width % value == 0 else f"cannot split the text width {width}"
    # vision_head_width: channels per head; the heads it makes (at least one) must split the tower's width
    tower = state_dict.get("visual.conv1.weight") if "visual.proj" in state_dict else \
        state_dict.get("visual.attnpool.k_proj.weight")
    width = tower.shape[0] if tower is not None else value
    return None if width % max(1, width // value) == 0 else f"makes heads that cannot split the image width {width}"


def infer_config(state_dict: Dict[str, torch.Tensor], **settings) -> CLIPConfig:
    """Every size from tensor shapes and key counts, as OpenAI's build_model (no size table); the
    SETTINGS shapes cannot tell come from `settings`, else OpenAI's: QuickGELU, heads of 64, eps 1e-5,
    text read at the highest id. A non-square image_resolution must fit the positional embedding; a
    setting of the wrong type or range (_setting_problem) is a ValueError naming it."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; build_model takes {SETTINGS}")
    family = unservable_family(state_dict)
    if family:
        raise ValueError(f"this is {family}, which this CLIP implementation cannot run")
    for name, value in settings.items():
        problem = _setting_problem(name, value, state_dict)
        if problem:
            raise ValueError(f"setting {name} = {_describe(value)} {problem}")
    common = ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    if "visual.proj" in state_dict:
        tower = ["visual.conv1.weight", "visual.positional_embedding", "visual.transformer.resblocks.0.mlp.c_fc.weight"]
    elif "visual.attnpool.positional_embedding" in state_dict:
        tower = ["visual.layer1.0.conv1.weight"]
    else:
        some = ", ".join(list(state_dict)[:5]) or "none"
        raise ValueError("not a CLIP state dict: it has neither 'visual.proj' (ViT image tower) nor "
                         f"'visual.attnpool.positional_embedding' (ResNet image tower); its first keys: {some}")
    missing = [k for k in common + tower + ["transformer.resblocks.0.mlp.c_fc.weight"] if k not in state_dict]
    if missing:
        raise ValueError(f"not a CLIP state dict: missing {', '.join(missing)}")
    vocab_size = state_dict["token_embedding.weight"].shape[0]

    vision_mlp_width = None
    if "visual.proj" in state_dict:
        conv = state_dict["visual.conv1.weight"]  # (width, 3, patch_h, patch_w)
        vision_layers = _count(state_dict, "visual.transformer.resblocks.", 3)
        vision_width, patch = conv.shape[0], tuple(conv.shape[-2:])
        cells = state_dict["visual.positional_embedding"].shape[0] - 1
        if "image_resolution" in settings:
            size = _pair(settings["image_resolution"])
            if (size[0] // patch[0]) * (size[1] // patch[1]) != cells:
                raise ValueError(f"image size {size} with patches {patch} does not fit its {cells} positions")
            image_resolution = size if size[0] != size[1] else size[0]
        elif math.isqrt(cells) ** 2 == cells and patch[0] == patch[1]:
            image_resolution = patch[0] * math.isqrt(cells)
        else:
            raise ValueError(f"its {cells} image positions with patches {patch} are not a square grid: "
                             "give the image size (open_clip_config.json's vision_cfg.image_size)")
        patch = patch[0] if patch[0] == patch[1] else patch
        vision_mlp_width = _mlp_width_unless_4x(state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                                                vision_width)
    else:
        vision_layers = tuple(_count(state_dict, f"visual.layer{i}.", 2) for i in (1, 2, 3, 4))
        vision_width, patch = state_dict["visual.layer1.0.conv1.weight"].shape[0], None
        image_resolution = 32 * math.isqrt(state_dict["visual.attnpool.positional_embedding"].shape[0] - 1)
        if settings.get("image_resolution", image_resolution) != image_resolution:
            raise ValueError(f"image size {settings['image_resolution']} does not fit the ResNet's attention "
                             f"pool, built for {image_resolution}")
    width = state_dict["ln_final.weight"].shape[0]
    settings = {"transformer_heads": max(1, width // 64), **settings, "image_resolution": image_resolution}
    return CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=vocab_size,
        transformer_width=width,
        transformer_layers=_count(state_dict, "transformer.resblocks.", 2),
        vision_mlp_width=vision_mlp_width,
        text_mlp_width=_mlp_width_unless_4x(state_dict["transformer.resblocks.0.mlp.c_fc.weight"], width),
        **settings,
    )


def build_model(state_dict: Dict[str, torch.Tensor], **settings) -> CLIP:
    """A float32 CLIP in eval mode holding state_dict's weights (OpenAI's key layout; fp16/bf16 cast up).

    settings: the CLIPConfig fields named in SETTINGS, which shapes cannot tell (activation, head
    widths, layer-norm eps, pooling id, a non-square image size); defaults are OpenAI's.
    Checks key names and every shape before copying (like nanoGPT's from_pretrained) and names the
    first mismatch. Non-weight tensors (cached attn_mask, the JIT archives' input_resolution,
    context_length, vocab_size) are ignored."""
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)
                  and k not in _NON_WEIGHTS and not k.endswith("attn_mask")}
    config = infer_config(state_dict, **settings)
    with torch.device("meta"):  # shapes only: skips a random initialisation that would be overwritten
        model = CLIP(**asdict(config))
    expected = model.state_dict()
    # BatchNorm's step counter is not a weight; files converted without it are fine
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"state dict does not match the CLIP inferred from it ({config}): "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{key}: expected shape {tuple(expected[key].shape)} for the CLIP inferred "
                             f"from the state dict ({config}), got {tuple(tensor.shape)}")
    model = model.to_empty(device="cpu")
    for key, buffer in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            buffer.zero_()
    model.load_state_dict(state_dict, strict=False)  # copy_ casts every tensor to float32
    return model.eval()


# ---- 3. The tokenizer (simple_tokenizer.py) ----
#
# OpenAI's byte-level BPE, each step explained where it happens; the ids are identical to
# clip.simple_tokenizer's.

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


@lru_cache()
def default_bpe() -> str:
    """The BPE merges file: beside this module (source tree, editable install), else where setup.py's
    data_files put it (<sys.prefix>/share/cilf-ciae/)."""
    name = "bpe_simple_vocab_16e6.txt.gz"
    places = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name),
              os.path.join(sys.prefix, "share", "cilf-ciae", name)]
    for place in places:
        if os.path.isfile(place):
            return place
    raise FileNotFoundError(f"CLIP BPE vocabulary {name} not found in {places}; reinstall the package "
                            "or pass bpe_path=")


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """A reversible map from the 256 byte values to 256 printable unicode characters.

    BPE runs on strings, and we want it to run on the UTF-8 *bytes* of any text (no unknown tokens,
    any script or emoji). Bytes that are already printable, non-space characters (! to ~, ¡ to ¬,
    ® to ÿ) map to themselves; the other 68 (control codes, space, soft hyphen, ...) are shifted to
    unused code points 256, 257, ... so no merge ever sees whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values, code_points = printable[:], printable[:]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + len(code_points) - len(printable))
    # the order (printable bytes first) fixes the first 256 vocabulary ids
    return dict(zip(byte_values, map(chr, code_points)))


# Pre-tokenising split, applied before BPE so merges never cross these boundaries: the two special
# tokens, common English contractions, runs of letters, single digits (so "37" is "3" "7": ages are
# read digit by digit), and runs of anything else that is neither space, letter nor digit.
_WORDS = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       regex.IGNORECASE)
_SPACES = regex.compile(r"\s+")
# printable ASCII without '&', plus tab and newline: ftfy.fix_text and html.unescape leave such text
# unchanged (nothing to repair, no entity), so the clean-up reduces to whitespace and lower case
_PLAIN = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def _clean(text: str) -> str:
    """OpenAI's normalisation: ftfy repair (mojibake, curly quotes, width, NFC), HTML entities undone
    twice (captions were often double-escaped), whitespace runs -> one space, strip, lower case."""
    if _PLAIN.fullmatch(text):
        return " ".join(text.split()).lower()  # the same result without ftfy's cost
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _SPACES.sub(" ", text).strip().lower()


class SimpleTokenizer:
    """Byte-level BPE with OpenAI's 49,408-token vocabulary: encode(text) -> ids, decode(ids) -> text."""

    def __init__(self, bpe_path: Optional[str] = None):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path or default_bpe(), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is a version header; the vocabulary keeps the first 49152 - 256 - 2 merges, listed
        # best first: a merge's line number is its rank (lower merges earlier)
        merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
        # ids: 256 byte characters, the same with the end-of-word mark, one per merge, two specials
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(merge) for merge in merges]
        vocab += [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]
        # word -> BPE pieces, and word -> ids (what encode needs); specials are whole tokens already
        self.cache = {SOT: (SOT,), EOT: (EOT,)}
        self._ids = {}

    def bpe(self, word: str) -> Tuple[str, ...]:
        """Merge a byte-encoded word's characters greedily, lowest-ranked adjacent pair first."""
        if word in self.cache:
            return self.cache[word]
        # "</w>" marks the last character, so "a" ending a word and "a" inside one are different symbols
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, math.inf))
            if best not in self.bpe_ranks:
                break  # no adjacent pair is a known merge: done
            first, second = best
            merged, i = [], 0
            while i < len(parts):  # replace every occurrence of the pair, left to right
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = tuple(parts)
        return self.cache[word]

    def encode(self, text: str) -> List[int]:
        ids = []
        for word in _WORDS.findall(_clean(text)):
            word_ids = self._ids.get(word)
            if word_ids is None:
                # UTF-8 bytes -> printable characters, BPE, then vocabulary ids
                encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                word_ids = self._ids[word] = [self.encoder[piece] for piece in self.bpe(encoded)]
            ids.extend(word_ids)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text: pieces joined, characters back to bytes, UTF-8 decoded, "</w>" -> space."""
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


# ---- 4. Image preprocessing (clip.py's _transform) ----

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB.

    8-bit modes (1, L, LA, P, PA, RGBA, CMYK, YCbCr, ...) use PIL's convert("RGB") exactly as OpenAI
    does (alpha is dropped, not composited). Deviation: wide modes are *scaled* to 8 bits, where
    convert("RGB") clips every value above 255 to white. I;16*: full range, value / 257.
    I (int32) and F (float): values in 0..255 kept, in 0..65535 (I) or 0..1 (F) scaled to 0..255,
    anything else stretched linearly from its min..max."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        x = np.asarray(image, dtype=np.float64)
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if image.mode in _SIXTEEN_BIT:
            x = x / 257.0
        elif image.mode == "F" and lo >= 0 and hi <= 1:
            x = x * 255.0
        elif image.mode == "I" and lo >= 0 and 255 < hi <= 65535:
            x = x / 257.0  # 16-bit data, as older Pillow opens 16-bit PNGs
        elif not (lo >= 0 and hi <= 255):
            x = (x - lo) * (255.0 / max(hi - lo, 1e-12))  # a constant image becomes black
        return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "La":  # premultiplied alpha, which PIL cannot convert: keep the L band
        image = image.getchannel(0)
    return image.convert("RGB")


def check_normalisation(mean, std) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) as three floats each, one per RGB channel, or a ValueError: three finite means and three
    finite stds > 0 (one value would be broadcast to every channel silently, a std of 0 divides by zero)."""
    for name, values, low in (("mean", mean, -math.inf), ("std", std, 0.0)):
        numbers = isinstance(values, (list, tuple)) and len(values) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low for v in values)
        if not numbers:
            given = (f"{len(values)} values: " + ", ".join(map(_describe, values[:5]))
                     if isinstance(values, (list, tuple)) else _describe(values))
            raise ValueError(f"image {name} must be three finite numbers{' > 0' if low == 0 else ''} (R, G, B), "
                             f"not {given}")
    return tuple(map(float, mean)), tuple(map(float, std))


def image_transform(n_px: Union[int, Tuple[int, int]], mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD, interpolation: str = "bicubic",
                    resize_mode: str = "shortest") -> Compose:
    """OpenAI's eval transform: resize of the short side to n_px (bicubic), centre crop, RGB, to
    tensor, normalise. PIL image -> (3, h, w) float tensor. The options are open_clip's
    preprocess_cfg: another mean/std or interpolation ("bicubic", "bilinear"); resize_mode "squash"
    resizes to (h, w) without keeping the aspect. A non-square (h, w) in "shortest" mode resizes the
    short side to max(h, w), then crops (open_clip resizes a little less, keeping more context)."""
    size = _pair(n_px)
    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
    if interpolation not in modes or resize_mode not in ("shortest", "squash"):
        raise ValueError(f"preprocessing with interpolation {interpolation!r} and resize_mode {resize_mode!r} "
                         f"is not served (interpolation: {sorted(modes)}; resize_mode: shortest, squash)")
    resize = ([Resize(size, interpolation=modes[interpolation])] if resize_mode == "squash" else
              [Resize(max(size), interpolation=modes[interpolation]), CenterCrop(size)])
    return Compose([*resize, to_rgb, ToTensor(), Normalize(tuple(mean), tuple(std))])


# ---- 5. load and tokenize (clip.py) ----
#
# load takes a file or a folder (it downloads nothing); how that file is found, read and checked is
# the second half of this file (sections 6 to 9).

class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint; the message names the file and what is wrong."""


def error_line(error: BaseException) -> str:
    """An exception as 'Type: first line', at most 200 characters (for one-line messages)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def load(path: str, device: Union[str, torch.device] = "cpu", trust_torchscript: bool = False,
         verify: bool = True, activation: Optional[str] = None, vision_head_width: Optional[int] = None,
         text_head_width: Optional[int] = None):
    """Load a CLIP checkpoint -> (model in eval mode on device, float32; preprocess).

    path: OpenAI's RN50.pt ... ViT-L-14-336px.pt; a state-dict file or open_clip's .bin/.safetensors
    (its open_clip_config.json read from beside it); a Hugging Face CLIPModel folder or the
    model.safetensors / pytorch_model.bin in one (its config.json read from beside it).
    activation ("quick_gelu" | "gelu"), vision_head_width, text_head_width: override any config.
    A file with neither a config nor OpenAI's name or SHA-256, loaded without an activation, gets a
    warning naming what is assumed (OpenAI's QuickGELU and heads of 64).
    verify: check the SHA-256 of files bearing an official OpenAI name (pass False for renamed or
    converted files). trust_torchscript: allow torch.jit.load for archives the data-only reader
    cannot parse (it runs the archive's code: only for files you trust). A config is checked against
    the weights (every size it states, heads, eps, image size, mean and std), a shard index against its
    shards. A file that cannot be read as a CLIP checkpoint raises CheckpointError (a ValueError) naming
    it, quoting none of its bytes."""
    path = os.fspath(path)
    weights, folder = _locate(path)
    verified = verify_checkpoint(weights) if verify else False
    try:
        state_dict = _read_weights(weights, trust_torchscript)
        state_dict, settings, stated, preprocessing, source = _read_configs_beside(state_dict, folder)
        if source is None and activation is None and not _is_openai(weights, verified):
            warnings.warn(
                f"{weights}: neither one of OpenAI's checkpoints (by name or SHA-256) nor accompanied by "
                f"{OPEN_CLIP_CONFIG} or {HF_CONFIG}, so OpenAI's architecture is assumed: QuickGELU activations "
                "and attention heads of 64 channels. open_clip's laion2b/datacomp/commonpool weights need GELU "
                "(activation='gelu', --clip-activation gelu), ViT-H/g/bigG heads of 80/88/104 "
                "(vision_head_width=, --clip-vision-head-width; text_head_width=, --clip-text-head-width); or "
                f"put the model's {OPEN_CLIP_CONFIG} beside the file.", stacklevel=2)
        settings.update(_settings_from_arguments(state_dict, activation, vision_head_width, text_head_width))
        model = build_model(state_dict, **settings)
        _check_stated(model.config, stated, source)
        model.image_mean, model.image_std = check_normalisation(preprocessing.get("mean", CLIP_MEAN),
                                                                preprocessing.get("std", CLIP_STD))
        preprocess = image_transform(model.visual.image_size, model.image_mean, model.image_std,
                                     preprocessing.get("interpolation", "bicubic"),
                                     preprocessing.get("resize_mode", "shortest"))
    except (CheckpointError, FileNotFoundError):  # a weights file that cannot be read names itself
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # shapes no CLIP has (a 1-D projection, ...) fail inside the arithmetic
        raise CheckpointError(f"{path}: not a CLIP state dict ({error_line(e)})") from None
    return model.to(device).eval(), preprocess


def _settings_from_arguments(state_dict: Dict[str, torch.Tensor], activation: Optional[str],
                             vision_head_width: Optional[int], text_head_width: Optional[int]) -> dict:
    """load()'s arguments as build_model settings (they win over any config)."""
    settings = {} if activation is None else {"activation": activation}
    for name, value in (("vision_head_width", vision_head_width), ("text_head_width", text_head_width)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive number of channels, got {value!r}")
    if vision_head_width is not None:
        settings["vision_head_width"] = vision_head_width
    if text_head_width is not None:
        text_width = state_dict["ln_final.weight"].shape[0] if "ln_final.weight" in state_dict else 0
        if text_width % text_head_width:
            raise ValueError(f"text heads of {text_head_width} channels cannot split the text width {text_width}")
        settings["transformer_heads"] = text_width // text_head_width
    return settings


@lru_cache()
def _default_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()  # built on first use: reading the vocabulary takes a fraction of a second


def token_count(text: str) -> int:
    """The tokens tokenize gives text, its start and end tokens included: what must fit the context."""
    return len(_default_tokenizer().encode(text)) + 2


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Texts -> (n, context_length) int64 ids: start token, BPE ids, end token, zero padding.

    An over-long text raises RuntimeError unless truncate=True, which cuts it and ends it with the
    end-of-text token (encode_text reads the embedding there)."""
    tok = _default_tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = []
    for text in texts:
        ids = [tok.sot_token, *tok.encode(text), tok.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text!r} is too long for context length {context_length} "
                                   f"({len(ids)} tokens with start/end); shorten it or pass truncate=True")
            ids = ids[:context_length]
            ids[-1] = tok.eot_token
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)


# ==== Part two: files you did not write ====


# ---- 6. Hugging Face and open_clip files: their layouts, the config files beside them ----
#
# Three layouts hold the same CLIP: OpenAI's (which open_clip keeps), and Hugging Face's CLIPModel,
# mapped here onto OpenAI's without loss. What no weight file tells (the activation, head widths,
# layer-norm eps, how text is pooled, a non-square image size, the normalisation) comes from the
# config file published beside the weights; load() warns when it has to assume OpenAI's values.

HF_CONFIG, OPEN_CLIP_CONFIG, HF_PREPROCESSOR_CONFIG = "config.json", "open_clip_config.json", "preprocessor_config.json"
# in the order a folder is searched; *.index.json lists the shards of a large model
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Hugging Face model types that are not CLIP's architecture, by family
_HF_FAMILIES = {"siglip": "SigLIP", "siglip2": "SigLIP 2", "chinese_clip": "Chinese-CLIP (a BERT text tower)",
                "altclip": "AltCLIP (an XLM-R text tower)", "clipseg": "CLIPSeg", "owlvit": "OWL-ViT",
                "owlv2": "OWLv2", "x_clip": "X-CLIP", "metaclip_2": "MetaCLIP 2 (a multilingual vocabulary)"}
# module names inside a Hugging Face encoder layer -> OpenAI's (q/k/v are concatenated separately)
_HF_BLOCK = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
             "self_attn.out_proj.": "attn.out_proj."}
_HF_NAMES = {"vision_model.embeddings.class_embedding": "visual.class_embedding",
             "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
             "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
             "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: Hugging Face's spelling
             "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
             "vision_model.post_layernorm.weight": "visual.ln_post.weight",
             "vision_model.post_layernorm.bias": "visual.ln_post.bias",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias",
             "logit_scale": "logit_scale"}
_HF_LAYER = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)")


def is_hf_layout(state_dict) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in state_dict)


def from_hf_state_dict(hf: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A Hugging Face CLIPModel state dict -> OpenAI's layout, losslessly: q/k/v projections
    concatenated into in_proj, the projection layers' (E, W) weights transposed to OpenAI's (W, E)
    matrices, layer norms renamed, the position_ids buffers dropped."""
    out, qkv = {}, {}
    for key, tensor in hf.items():
        layer = _HF_LAYER.fullmatch(key)
        if key.endswith("position_ids"):
            continue  # an arange buffer that older files saved, not a weight
        elif key in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if key.startswith("visual") else "text_projection"] = tensor.t()  # (E, W) -> (W, E)
        elif key in _HF_NAMES:
            out[_HF_NAMES[key]] = tensor
        elif layer:
            tower, index, name = layer.groups()
            block = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{index}."
            module, _, kind = name.rpartition(".")  # kind: weight or bias
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((block, kind), {})[module[len("self_attn.")]] = tensor  # "q", "k" or "v"
                continue
            old = next((old for old in _HF_BLOCK if name.startswith(old)), None)
            if old is None:
                raise ValueError(f"Hugging Face key {key} has no place in CLIP's layout")
            out[block + _HF_BLOCK[old] + name[len(old):]] = tensor
        else:
            raise ValueError(f"Hugging Face key {key} has no place in CLIP's layout (a CLIPModel has "
                             "vision_model.*, text_model.*, visual_projection, text_projection, logit_scale)")
    for (block, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{block}: Hugging Face attention {kind} has only {sorted(parts)} of q, k, v")
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])  # (3W, ...)
    return out


def _hf_head_width(tower: dict, name: str, default_width: int, default_heads: int) -> int:
    width, heads = tower.get("hidden_size", default_width), tower.get("num_attention_heads", default_heads)
    if not (_is_count(width) and _is_count(heads) and width % heads == 0):
        raise ValueError(f"{HF_CONFIG}: {name}.hidden_size {_describe(width)} is not a multiple of "
                         f"num_attention_heads {_describe(heads)} (two positive integers)")
    return width // heads


# Sizes a Hugging Face config states, as CLIPConfig fields (checked against the weights): field -> (tower, key)
_HF_STATED = {"vision_width": ("vision_config", "hidden_size"), "vision_layers": ("vision_config", "num_hidden_layers"),
              "vision_mlp_width": ("vision_config", "intermediate_size"),
              "vision_patch_size": ("vision_config", "patch_size"), "transformer_width": ("text_config", "hidden_size"),
              "transformer_layers": ("text_config", "num_hidden_layers"),
              "text_mlp_width": ("text_config", "intermediate_size"),
              "context_length": ("text_config", "max_position_embeddings"), "embed_dim": (None, "projection_dim")}


def hf_stated(config: dict) -> dict:
    """The sizes a Hugging Face CLIPModel's config.json states (the keys it has), as CLIPConfig fields: the
    weights must hold them, or the config belongs to another model (a wrong hidden_size would otherwise
    change the vision heads silently)."""
    towers = {None: config, "vision_config": config.get("vision_config") or {},
              "text_config": config.get("text_config") or {}}
    return {field: towers[tower][key] for field, (tower, key) in _HF_STATED.items() if key in towers[tower]}


def hf_settings(config: dict) -> dict:
    """build_model settings from a Hugging Face CLIPModel's config.json (absent keys: Hugging Face's
    defaults). The text is pooled as that config makes Hugging Face pool it: at the highest id when
    eos_token_id is 2 (configs written before transformers PR #24773), else at the first eos_token_id."""
    model_type = config.get("model_type")
    if model_type != "clip":
        family = _HF_FAMILIES.get(model_type, f"model_type {_describe(model_type)}") if isinstance(model_type, str) \
            else f"model_type {_describe(model_type)}"
        raise ValueError(f"{HF_CONFIG} describes {family}, not a CLIPModel this project can run")
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(activations) > 1 or not activations <= set(ACTIVATIONS):
        raise ValueError(f"{HF_CONFIG}: hidden_act {', '.join(map(_describe, activations))}; this CLIP runs one of "
                         f"{sorted(ACTIVATIONS)} in both towers")
    vocab, bos, eos = text.get("vocab_size", OPENAI_VOCAB_SIZE), text.get("bos_token_id", 49406), text.get("eos_token_id", 49407)
    if (vocab, bos) != (OPENAI_VOCAB_SIZE, 49406) or eos not in (2, 49407):
        raise ValueError(f"{HF_CONFIG}: text vocabulary {_describe(vocab)} with bos/eos ids {_describe(bos)}/"
                         f"{_describe(eos)} is not OpenAI's "
                         f"({OPENAI_VOCAB_SIZE}, 49406/49407): this project's BPE tokenizer cannot serve it")
    image_size = vision.get("image_size", 224)
    return {"activation": activations.pop(),
            "vision_head_width": _hf_head_width(vision, "vision_config", 768, 12),
            "transformer_heads": text.get("hidden_size", 512) // _hf_head_width(text, "text_config", 512, 8),
            "vision_ln_eps": vision.get("layer_norm_eps", 1e-5), "text_ln_eps": text.get("layer_norm_eps", 1e-5),
            "text_eos_id": None if eos == 2 else eos,
            "image_resolution": tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size}


# open_clip settings this CLIP cannot run, with the family that uses them. A setting whose value
# differs from the one given here refuses the file.
_OPEN_CLIP_UNSERVABLE = {
    "vision_cfg": {"timm_model_name": (None, "open_clip with a timm image tower (ConvNeXt, EVA02, ViTamin, ...)"),
                   "attentional_pool": (False, "CoCa (attentional pooler)"),
                   "no_ln_pre": (False, "CLIPA (an image tower without ln_pre)"),
                   "pool_type": ("tok", "CLIPA-style average pooling"),
                   "final_ln_after_pool": (False, "CLIPA (layer norm after pooling)"),
                   "ls_init_value": (None, "a ViT with layer scale"),
                   "pos_embed_type": ("learnable", "fixed sin-cos position embeddings"),
                   "act_kwargs": (None, "a parametrised activation")},
    "text_cfg": {"hf_model_name": (None, "a Hugging Face text tower (RoBERTa, XLM-R, mT5, ...)"),
                 "hf_tokenizer_name": (None, "another vocabulary (a Hugging Face tokenizer)"),
                 "tokenizer_mode": (None, "another tokenizer"),
                 "tokenizer_kwargs": (None, "another tokenizer's text cleaning (SigLIP)"),
                 "vocab_size": (OPENAI_VOCAB_SIZE, "another vocabulary"),
                 "embed_cls": (False, "CoCa (a text class token)"),
                 "no_causal_mask": (False, "a bidirectional text tower (SigLIP, CLIPA)"),
                 "proj_bias": (False, "SigLIP (a text projection with bias)"),
                 "proj_type": ("linear", "a text projection layer"),
                 "final_ln_after_pool": (False, "layer norm after text pooling"),
                 "ls_init_value": (None, "a text tower with layer scale"),
                 "act_kwargs": (None, "a parametrised activation")},
}
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _open_clip_eps(tower: dict, name: str) -> float:
    norm = tower.get("norm_kwargs") or {}
    if set(norm) - {"eps"}:
        raise ValueError(f"{OPEN_CLIP_CONFIG}: {name}.norm_kwargs has {', '.join(map(_describe, norm))} "
                         "(only eps is served)")
    return norm.get("eps", 1e-5)


def open_clip_settings(config: dict) -> Tuple[dict, dict, dict]:
    """An open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}, or a bare model config as
    in open_clip's model_configs/) -> (build_model settings, the sizes it states as CLIPConfig fields
    (checked against the weights), preprocessing: mean, std, interpolation, resize_mode).
    Defaults are open_clip's (CLIPVisionCfg, CLIPTextCfg): GELU unless quick_gelu, heads of 64."""
    model_cfg = config.get("model_cfg", config)
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    for key, family in (("init_logit_bias", "SigLIP (logit_bias)"), ("multimodal_cfg", "CoCa (a text decoder)"),
                        ("custom_text", "CustomTextCLIP (a custom text tower)")):
        if model_cfg.get(key):
            raise ValueError(f"{OPEN_CLIP_CONFIG} describes {family}, which this CLIP implementation cannot run")
    for tower_name, tower in (("vision_cfg", vision), ("text_cfg", text)):
        for key, (default, family) in _OPEN_CLIP_UNSERVABLE[tower_name].items():
            if tower.get(key, default) not in (default, {} if default is None else default):
                raise ValueError(f"{OPEN_CLIP_CONFIG}: {tower_name}.{key} = {_describe(tower[key])} is {family}, "
                                 "which this CLIP implementation cannot run")
        custom = [k for k in _CUSTOM_BLOCK if tower.get(k)] + ([tower["block_type"]] if tower.get("block_type") not in
                                                                (None, "default") else [])
        if custom:
            raise ValueError(f"{OPEN_CLIP_CONFIG}: {tower_name} uses open_clip's custom attention block "
                             f"({', '.join(map(_describe, custom))}), "
                             "which this CLIP implementation cannot run")
    text_eos_id = None
    if text.get("pool_type", "argmax") == "eos" and text.get("eos_id", 2) == 49407:
        text_eos_id = 49407
    elif text.get("pool_type", "argmax") != "argmax":
        raise ValueError(f"{OPEN_CLIP_CONFIG}: text_cfg.pool_type {_describe(text['pool_type'])} (eos_id "
                         f"{_describe(text.get('eos_id', 2))}) "
                         "is not served: our tokenizer ends every text with 49407")
    width, patch, size = vision.get("width", 768), vision.get("patch_size", 16), vision.get("image_size", 224)
    head_width = vision.get("head_width", 64)
    settings = {"activation": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
                "vision_head_width": head_width, "transformer_heads": text.get("heads", 8),
                "vision_ln_eps": _open_clip_eps(vision, "vision_cfg"), "text_ln_eps": _open_clip_eps(text, "text_cfg"),
                "text_eos_id": text_eos_id, "image_resolution": tuple(size) if isinstance(size, (list, tuple)) else size}
    layers = vision.get("layers", 12)
    resnet = isinstance(layers, (list, tuple))
    stated = {"embed_dim": model_cfg.get("embed_dim"), "vision_layers": tuple(layers) if resnet else layers,
              "vision_width": width, "transformer_width": text.get("width", 512),
              "transformer_layers": text.get("layers", 12), "context_length": text.get("context_length", 77)}
    if not resnet:
        patch = _pair(patch)
        stated.update(vision_patch_size=patch[0] if patch[0] == patch[1] else patch,
                      vision_mlp_width=int(width * vision.get("mlp_ratio", 4.0)))
    stated["text_mlp_width"] = int(stated["transformer_width"] * text.get("mlp_ratio", 4.0))
    pre = config.get("preprocess_cfg") or {}
    preprocessing = {k: pre[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pre}
    return settings, stated, preprocessing


def _check_stated(config: CLIPConfig, stated: dict, source: str):
    """Every size a config file states must be what the weights hold (MLP widths: None means 4 x width)."""
    effective = asdict(config)
    effective["vision_mlp_width"] = config.vision_mlp_width or 4 * config.vision_width
    effective["text_mlp_width"] = config.text_mlp_width or 4 * config.transformer_width
    for field, value in stated.items():
        if value is not None and effective[field] != value:
            said = ", ".join(map(_describe, value)) if isinstance(value, (list, tuple)) else _describe(value)
            raise ValueError(f"{source} states {field} = {said}, but the weights hold {effective[field]}: the "
                             "config belongs to another model")


def _read_json(path: str) -> dict:
    """A JSON object from a file; a file that is not one is a ValueError that names it and quotes none of
    its bytes (a config may be a link to any file)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a readable JSON config (not UTF-8 text)") from None
    except RecursionError:
        raise ValueError(f"{path}: not a readable JSON config (nested too deep)") from None
    except (OSError, ValueError) as e:  # json's messages give a position, never the text
        raise ValueError(f"{path}: not a readable JSON config ({error_line(e)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a JSON {type(config).__name__}, not a config object")
    return config


def _read_config(reader, path: str):
    """reader(the JSON config at path), with a config of the wrong shape (a list where a dict belongs,
    text where a number does) reported as such, not as a traceback."""
    try:
        return reader(_read_json(path))
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{os.path.basename(path)} is malformed ({type(e).__name__}: {e})") from None


class _ConfigsBeside(NamedTuple):
    """What the config files beside a weights file say about its state dict."""
    state_dict: Dict[str, torch.Tensor]  # in OpenAI's layout
    settings: dict  # build_model settings
    stated: dict  # sizes the config states, as CLIPConfig fields (checked against the weights)
    preprocessing: dict  # mean, std, interpolation, resize_mode
    source: Optional[str]  # the config's path; None when no config describes the weights


def _read_configs_beside(state_dict: Dict[str, torch.Tensor], folder: str) -> _ConfigsBeside:
    """What the config files in folder say about state_dict (a Hugging Face layout converted to
    OpenAI's). A family this CLIP cannot run is refused first (its config may not even be a CLIP's)."""
    beside = lambda name: os.path.join(folder, name) if os.path.isfile(os.path.join(folder, name)) else None
    if is_hf_layout(state_dict):
        source = beside(HF_CONFIG)
        if source is None:
            raise ValueError(f"a Hugging Face CLIPModel state dict, without the {HF_CONFIG} that must be "
                             "beside it (its activation, heads, layer-norm eps and pooling rule)")
        settings = _read_config(hf_settings, source)  # refuses SigLIP & co. by their model_type
        processor = _read_json(beside(HF_PREPROCESSOR_CONFIG)) if beside(HF_PREPROCESSOR_CONFIG) else {}
        preprocessing = {k: processor[f"image_{k}"] for k in ("mean", "std") if f"image_{k}" in processor}
        return _ConfigsBeside(from_hf_state_dict(state_dict), settings, _read_config(hf_stated, source), preprocessing,
                              source)
    family = unservable_family(state_dict)
    if family:
        raise ValueError(f"this is {family}, which this CLIP implementation cannot run")
    source = beside(OPEN_CLIP_CONFIG)
    if source is None:
        return _ConfigsBeside(state_dict, {}, {}, {}, None)
    return _ConfigsBeside(state_dict, *_read_config(open_clip_settings, source), source)


def _locate(path: str) -> Tuple[str, str]:
    """A file, or a folder holding one -> (weights file, its folder). A folder is searched for
    open_clip's file names first (with open_clip_config.json beside them), then Hugging Face's."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
        return path, os.path.dirname(os.path.abspath(path))
    has = lambda name: os.path.isfile(os.path.join(path, name))
    names = ([n for n in _OPEN_CLIP_WEIGHTS if has(n)] if has(OPEN_CLIP_CONFIG) else []) + \
            ([n for n in _HF_WEIGHTS if has(n)] if has(HF_CONFIG) else [])
    if not names:
        raise FileNotFoundError(f"{path}: a folder without CLIP weights and their config: expected {HF_CONFIG} with one "
                                f"of {', '.join(_HF_WEIGHTS)}, or {OPEN_CLIP_CONFIG} with one of "
                                f"{', '.join(_OPEN_CLIP_WEIGHTS)}")
    return os.path.join(path, names[0]), path


# ---- 7. Reading checkpoint files as data: safetensors, TorchScript archives, shards ----
#
# No file's code is run: a .safetensors file is read by hand, OpenAI's TorchScript archives by a
# restricted reader of their pickle and tensor records, anything else by safe_torch_load (section 8).

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(path: str, f) -> Tuple[int, Dict[str, Tuple[torch.dtype, List[int], int, int]]]:
    """The validated header: (where the data starts, {name: (dtype, shape, begin, end)}). Offsets are
    integers with 0 <= begin <= end <= data size, end - begin is the shape's byte count, ranges do not
    overlap, dtypes are known, the header is at most _MAX_SAFETENSORS_HEADER bytes of JSON with no
    duplicate names."""
    size = os.path.getsize(path)
    head = f.read(8)
    if len(head) != 8:
        raise CheckpointError("not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise CheckpointError(f"not a safetensors file (its first 8 bytes, the header length, exceed the file's "
                              f"{size} bytes or {_MAX_SAFETENSORS_HEADER >> 20} MiB)")  # never the bytes themselves

    def no_duplicates(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise CheckpointError("its header names a tensor twice")
        return dict(pairs)

    try:
        header = json.loads(f.read(n), object_pairs_hook=no_duplicates)
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"not a safetensors file (header is not JSON: {error_line(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (header is not a JSON object)")
    start, data_size, tensors = 8 + n, size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"tensor {_describe(name)}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{what}: header entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = _SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None:
            raise CheckpointError(f"{what} has unsupported dtype {_describe(info['dtype'])}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
                and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{what}: shape must be a list of at most {_MAX_DIMS} integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"{what}: data_offsets must be two integers 0 <= begin <= end <= "
                                  f"{data_size} (the data's size; file truncated?)")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{what} {shape} {info['dtype']} does not fit its byte range {begin}..{end}")
        tensors[name] = (dtype, shape, begin, end)
    ranges = sorted((begin, end) for _, _, begin, end in tensors.values())
    if any(b < a_end for (_, a_end), (b, _) in zip(ranges, ranges[1:])):
        raise CheckpointError("tensors' byte ranges overlap")
    return start, tensors


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the raw little-endian bytes of every tensor. The whole header is checked
    (_safetensors_header) before any tensor is allocated."""
    if sys.byteorder != "little":
        raise CheckpointError("reading safetensors needs a little-endian machine")
    out = {}
    with open(path, "rb") as f:
        start, tensors = _safetensors_header(path, f)
        for name, (dtype, shape, begin, end) in tensors.items():
            buffer = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"tensor {_describe(name)}: file truncated")
            flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            out[name] = flat.reshape(shape)
    return out


class _ArchiveError(CheckpointError):
    """The restricted reader cannot (or will not) read this TorchScript archive."""


class _Inert:
    """Base of every object the archive reader hands to the pickle: a BUILD on it is refused, so a
    file cannot set attributes on the reader's classes or functions (nor grow a storage)."""
    __slots__ = ()

    def __setstate__(self, state):
        raise _ArchiveError(f"its data.pkl BUILDs a {type(self).__name__.lstrip('_')}, which no archive does")


class _ScriptObject:
    """Inert stand-in for a TorchScript class (a module): it only keeps its pickled state, set once."""
    __slots__ = ("state",)

    def __init__(self, *args):
        pass

    def __setstate__(self, state):  # BUILD; NEWOBJ made the instance without __init__
        if getattr(self, "state", None) is not None or not isinstance(state, dict):
            raise _ArchiveError(f"a TorchScript object's state is {_describe(state)}, not one dict")
        self.state = state


class _Callable(_Inert):
    """An allow-listed function as the pickle sees it (a fresh instance per archive)."""
    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)


class _StorageType(_Inert):
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage(_Inert):
    """One data/<key> record as a flat tensor (a persistent id's value)."""
    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


class _TensorView(_Inert):
    """A checked view of a _Storage; the tensor itself is made after unpickling (_materialize)."""
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}
_RECORD_KEY = regex.compile(r"[0-9A-Za-z_]{1,64}")


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl (already passed by scan_pickle) allowing only:
    TorchScript module classes (as inert _ScriptObjects), storage type names, the tensor rebuild
    function, OrderedDict. Any other global (os.system, builtins.eval, ...) is refused before it can
    be called. Storages and tensors come out as inert records, checked before use."""

    def __init__(self, data: bytes, f, records: Dict[str, zipfile.ZipInfo], prefix: str):
        super().__init__(io.BytesIO(data))
        self.file, self.records, self.prefix, self.storages = f, records, prefix, {}
        rebuild, ordered_dict = _Callable(self._rebuild_tensor), _Callable(OrderedDict)
        self.callables = {("torch._utils", "_rebuild_tensor_v2"): rebuild, ("torch._utils", "_rebuild_tensor"): rebuild,
                          ("collections", "OrderedDict"): ordered_dict}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self.callables:
            return self.callables[module, name]
        raise _ArchiveError(f"its data.pkl refers to {module}.{name}, which the data-only reader does not allow")

    def persistent_load(self, pid):
        # ('storage', storage type, record key, location, numel): the bytes are in <prefix>data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[3], str)
                and type(pid[4]) is int and _RECORD_KEY.fullmatch(pid[2]) and len(pid[3]) <= 64):
            what = _describe(pid) if not isinstance(pid, tuple) else f"a tuple of {len(pid)}"
            raise _ArchiveError(f"unknown persistent record ({what}; expected 'storage', type, key, location, numel)")
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        if key not in self.storages:
            info = self.records.get(f"{self.prefix}data/{key}")
            if info is None:
                raise _ArchiveError(f"tensor record data/{key} is missing")
            if info.file_size != numel * dtype.itemsize:
                raise _ArchiveError(f"tensor record data/{key} holds {info.file_size} bytes, not the "
                                    f"{numel} x {dtype.itemsize} its storage declares")
            self.storages[key] = _Storage(_read_record(self.file, info).view(dtype))
        storage = self.storages[key]
        if storage.flat.dtype != dtype or storage.flat.numel() != numel:
            raise _ArchiveError(f"tensor record data/{key} is declared with two types or sizes")
        return storage

    def _rebuild_tensor(self, storage, offset, size, stride, *unused):
        """torch._utils._rebuild_tensor_v2's arguments, checked; the view is made after unpickling."""
        if not isinstance(storage, _Storage):
            raise _ArchiveError(f"a tensor's storage is {_describe(storage)}")
        problem = _view_problem(storage.flat.numel(), offset, size, stride)
        if problem:
            raise _ArchiveError(f"a tensor view is refused: {problem}")
        return _TensorView(storage, offset, size, stride)


def _collect_tensors(root) -> Dict[str, _TensorView]:
    """Walk the module tree; each module's state dict maps attribute names to tensors/submodules.
    Each module is visited once (a module shared by two parents is read under its first name) and at
    most _MAX_NESTING deep; names and keys are checked before use."""
    out, seen, todo = {}, set(), [(root, "", 0)]
    while todo:
        obj, prefix, depth = todo.pop()
        if isinstance(obj, _TensorView):
            out[prefix[:-1]] = obj
        elif isinstance(obj, _ScriptObject) and isinstance(getattr(obj, "state", None), dict) and id(obj) not in seen:
            seen.add(id(obj))
            if depth > _MAX_NESTING:
                raise _ArchiveError(f"its module tree is more than {_MAX_NESTING} deep")
            for name, value in obj.state.items():
                if not (isinstance(name, str) and 0 < len(name) <= 256):
                    raise _ArchiveError(f"a module attribute is named {_describe(name)}")
                todo.append((value, f"{prefix}{name}.", depth + 1))
    return out


def _read_torchscript(path: str) -> Dict[str, torch.Tensor]:
    """A TorchScript archive is a zip: <name>/data.pkl pickles the module tree, whose tensors point
    at raw records <name>/data/<key>. The code in <name>/code/ is never read or run. Records, the
    pickle and every tensor view are checked first (section 8)."""
    records = _zip_records(path)
    name = _one_data_pickle(records)
    with open(path, "rb") as f:
        data = _read_record(f, records[name]).numpy().tobytes()
        scan_pickle(data, name)
        try:
            root = _ArchiveUnpickler(data, f, records, name[: -len("data.pkl")]).load()
        except CheckpointError:
            raise
        except Exception as e:  # what the scan cannot see: a wrong type where the reader needs another
            raise _ArchiveError(f"its data.pkl could not be read ({error_line(e)})") from None
    views = _collect_tensors(root)
    if not views:
        raise _ArchiveError("no tensors found in its module tree")
    out, made, distinct = {}, {}, []  # a view named twice is one tensor
    for key, view in views.items():
        if id(view) not in made:
            made[id(view)] = view.storage.flat.as_strided(view.size, view.stride, view.offset)
            distinct.append((key, made[id(view)]))
        out[key] = made[id(view)]
    _check_tensors(distinct, os.path.getsize(path))
    return out


def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except Exception:  # an unreadable zip: safe_torch_load names the problem
        return False


def read_state_dict(path: str, trust_torchscript: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, read as data: OpenAI's TorchScript archives (restricted
    reader), .safetensors (by hand), anything else with safe_torch_load. A dict nested under
    "state_dict" and a "module." prefix (DistributedDataParallel) are unwrapped. Raises
    CheckpointError "<path>: ..." for a file that cannot be read as a state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        try:
            state = _read_torchscript(path)
        except CheckpointError as e:
            if not trust_torchscript:
                raise CheckpointError(
                    f"{path}: this TorchScript archive cannot be read as data only: {e}. If you trust the "
                    "file, pass trust_torchscript=True to load it with torch.jit.load (which runs its code)."
                ) from None
            state = torch.jit.load(path, map_location="cpu").state_dict()
    elif path.endswith(".safetensors") or _looks_like_safetensors(path):
        try:
            state = _read_safetensors(path)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    else:
        state = safe_torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds {_describe(state)}, not a state dict")
    bad = next((k for k in state if not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: a state dict key is {_describe(bad)}, not a string")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_weights(path: str, trust_torchscript: bool) -> Dict[str, torch.Tensor]:
    """read_state_dict, or for a *.index.json of a sharded Hugging Face model, every shard it names: each
    tensor in the one shard the index gives it (a tensor in two shards, or in none, is refused)."""
    if not path.endswith(".index.json"):
        return read_state_dict(path, trust_torchscript=trust_torchscript)
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path}: its weight_map must map each tensor name to a shard file name")
    state, shard_of = {}, {}
    for shard in dict.fromkeys(weight_map.values()):  # each shard once, in order
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{path}: shard {_describe(shard)} is not a file name in the model's folder")
        for name, tensor in read_state_dict(os.path.join(os.path.dirname(path), shard)).items():
            if name in shard_of:
                raise ValueError(f"{path}: tensor {_describe(name)} is held by two shards, {shard_of[name]} and "
                                 f"{shard}")
            state[name], shard_of[name] = tensor, shard
    absent = [name for name, shard in weight_map.items() if shard_of.get(name) != shard]
    if absent:
        raise ValueError(f"{path}: {len(absent)} tensor(s) the index lists are not in the shard it names, e.g. "
                         f"{_describe(absent[0])} in {_describe(weight_map[absent[0]])}")
    return state


# ---- 8. Hostile checkpoint files: pickle opcode scan, zip records, tensor views ----
#
# Researchers load checkpoints from third parties. Besides never running a file's code, the readers
# (section 7, safe_torch_load here) refuse, before unpickling or allocating anything, what no honest
# checkpoint contains but a few crafted bytes can use to crash the process, hang it, allocate
# gigabytes or read memory that is not the file's: deep or cyclic nesting, shared sub-objects
# multiplied along every path, memo indices far beyond the pickle's length, compressed zip records,
# views that reach outside their storage, overlap themselves (stride 0) or outnumber the file's
# bytes. Each refusal is one CheckpointError naming the file and what is wrong; an untrusted object
# is never printed in full.

_MAX_NESTING = 100  # containers within containers; OpenAI's archives nest about 20 deep
_MAX_SHARED_EXPANSION = 16  # objects a pickle may expand to (shared ones counted per use), per byte
_MAX_DIMS = 16  # dimensions of one tensor
_MAX_TENSOR_BYTES = 2  # bytes of tensors per byte of file (views sharing storage count separately)
_MAX_SAFETENSORS_HEADER = 16 << 20  # bytes of JSON header; CLIP's are tens of kilobytes

# The pickle opcodes torch's writers emit (torch.save at its protocol 2; TorchScript's C++ pickler)
# and torch.load(weights_only=True) reads. No checkpoint needs the others: protocol 0/1 text forms,
# POP/DUP, INST/OBJ/EXT, STACK_GLOBAL, FRAME, MEMOIZE, out-of-band buffers.
_PICKLE_OPS = {op[0] for op in (
    pickle.PROTO, pickle.STOP, pickle.GLOBAL, pickle.REDUCE, pickle.NEWOBJ, pickle.BUILD, pickle.BINPERSID,
    pickle.MARK, pickle.EMPTY_TUPLE, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3,
    pickle.EMPTY_LIST, pickle.APPEND, pickle.APPENDS, pickle.EMPTY_DICT, pickle.SETITEM, pickle.SETITEMS,
    pickle.EMPTY_SET, pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.BININT, pickle.BININT1,
    pickle.BININT2, pickle.LONG1, pickle.BINFLOAT, pickle.BINUNICODE, pickle.SHORT_BINSTRING,
    pickle.BINPUT, pickle.LONG_BINPUT, pickle.BINGET, pickle.LONG_BINGET)}
_ARG_BYTES = {pickle.PROTO[0]: 1, pickle.BININT[0]: 4, pickle.BININT1[0]: 1, pickle.BININT2[0]: 2,
              pickle.BINFLOAT[0]: 8, pickle.BINPUT[0]: 1, pickle.LONG_BINPUT[0]: 4, pickle.BINGET[0]: 1,
              pickle.LONG_BINGET[0]: 4}
# The callables torch's writers pickle for checkpoint data (REDUCE), each allocating no more than
# its arguments' bytes: a tensor or parameter, an OrderedDict, a set, bytes (_codecs.encode), a size,
# a device, a complex number. torch.load's allow-list has more (torch.Tensor(n), bytearray(n) and
# quantized tensors allocate n from one integer, meta tensors have any size): no checkpoint needs them.
_PICKLE_CALLABLES = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor",
                     "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
                     "collections.OrderedDict", "builtins.set", "_codecs.encode", "torch.Size", "torch.device",
                     "builtins.complex", "torch.serialization._get_layout"}
_PICKLE_MODULES = ("torch", "__torch__", "collections", "_codecs", "builtins")


def _describe(obj) -> str:
    """A few words about an untrusted object for an error message, never its full repr (which can be
    huge, or take exponential time for a list shared with itself at every level)."""
    if isinstance(obj, (str, bytes)):
        return repr(obj[:40]) + ("..." if len(obj) > 40 else "")
    if isinstance(obj, bool) or obj is None or isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, int):
        return str(obj) if obj.bit_length() < 64 else f"an integer of {obj.bit_length()} bits"
    return f"a {type(obj).__name__}"


class _Node:
    """What the opcode scan knows of one pickled object: how deep it nests, how many objects it
    expands to (shared sub-objects counted per use), whether it sits inside another object yet."""
    __slots__ = ("kind", "name", "depth", "size", "placed", "built")

    def __init__(self, kind: str, children=(), name: str = ""):
        self.kind, self.name, self.placed, self.built = kind, name, False, False
        self.depth = 1 + max((c.depth for c in children), default=0)
        self.size = 1 + sum(c.size for c in children)
        for child in children:
            child.placed = True


def scan_pickle(data: bytes, where: str = "pickle") -> int:
    """Check the pickle at the start of data opcode by opcode, without building anything; returns
    the position after its STOP. Raises CheckpointError("<where>: ... (byte N)") on an opcode outside
    _PICKLE_OPS, a global outside torch/collections/_codecs/builtins, a call outside
    _PICKLE_CALLABLES (NEWOBJ: TorchScript classes only), a BUILD on anything but a TorchScript
    object or an OrderedDict, nesting deeper than _MAX_NESTING, an expansion beyond
    _MAX_SHARED_EXPANSION objects per byte, a memo index beyond the opcodes read so far, a container
    changed after it was placed in another (the only way to make a cycle), or a malformed stream.

    The stack is simulated with _Nodes so that depth and expansion are exact: torch's writers fill
    every container before placing it, which is what the last rule demands."""
    stack, metastack, memo = [], [], {}
    value = _Node("value")  # one node for every scalar (number, string, None, bool): a leaf
    value.depth = 0
    budget = 1_000_000 + _MAX_SHARED_EXPANSION * len(data)
    pos, ops, at = 0, 0, 0

    def refuse(reason: str):
        raise CheckpointError(f"{where}: {reason} (byte {at})")

    def argument(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            refuse("the pickle is truncated")
        pos += n
        return data[pos - n: pos]

    def push(node: _Node):
        if node.depth > _MAX_NESTING:
            refuse(f"objects nested more than {_MAX_NESTING} deep")
        if node.size > budget:
            refuse(f"shared objects expand to more than {budget:,} objects")
        stack.append(node)

    def pop_mark() -> list:
        nonlocal stack
        if not metastack:
            refuse("an opcode needs a MARK that is not there")
        items, stack = stack, metastack.pop()
        return items

    def fill(target: _Node, kinds: Tuple[str, ...], items: list):
        """target (still on the stack) receives items: APPEND(S), SETITEM(S), BUILD."""
        for item in items:
            item.placed = True
        if target.kind not in kinds:
            refuse(f"{pickle_name} on a {target.kind}")
        if target.placed:
            refuse(f"{pickle_name} changes an object already placed inside another (a cycle?)")
        target.depth = max(target.depth, 1 + max((i.depth for i in items), default=0))
        target.size += sum(i.size for i in items)
        stack.pop()
        push(target)

    try:
        while True:
            at = pos
            op = data[pos] if pos < len(data) else None
            if op is None:
                refuse("the pickle ends without STOP (truncated?)")
            pos, ops = pos + 1, ops + 1
            pickle_name = _PICKLE_OP_NAMES.get(op) or f"opcode 0x{op:02x}"
            if op not in _PICKLE_OPS:
                refuse(f"{pickle_name}, which torch's checkpoint writers never emit")
            arg = argument(_ARG_BYTES[op]) if op in _ARG_BYTES else b""
            if op in (pickle.BINPUT[0], pickle.LONG_BINPUT[0]):  # the commonest opcodes first
                index = arg[0] if op == pickle.BINPUT[0] else struct.unpack("<I", arg)[0]
                if index >= ops:  # torch's writers number memo entries 0, 1, 2, ...
                    refuse(f"memo index {index} after only {ops} opcodes")
                memo[index] = stack[-1]
            elif op in (pickle.BINGET[0], pickle.LONG_BINGET[0]):
                index = arg[0] if op == pickle.BINGET[0] else struct.unpack("<I", arg)[0]
                if index not in memo:
                    refuse(f"memo index {index} that was never set")
                push(memo[index])
            elif op in _SCALAR_OPS:
                push(value)
            elif op in (pickle.BINUNICODE[0], pickle.SHORT_BINSTRING[0], pickle.LONG1[0]):
                n = struct.unpack("<I", argument(4))[0] if op == pickle.BINUNICODE[0] else argument(1)[0]
                argument(n)
                push(value)
            elif op == pickle.GLOBAL[0]:
                lines = []
                for _ in range(2):
                    end = data.find(b"\n", pos, pos + 257)
                    if end < 0:
                        refuse("GLOBAL without a short name")
                    lines.append(data[pos:end].decode("ascii", "replace"))
                    pos = end + 1
                module, name = lines
                module = "builtins" if module == "__builtin__" else module  # protocol 2's Python 2 name
                if not (module in _PICKLE_MODULES or module.startswith(("torch.", "__torch__."))):
                    refuse(f"it refers to {module[:100]}.{name[:100]}, which no checkpoint needs")
                push(_Node("global", name=f"{module}.{name}"))
            elif op == pickle.MARK[0]:
                metastack.append(stack)
                stack = []
            elif op in _TUPLE_SIZES:
                n = _TUPLE_SIZES[op]
                if n is None:
                    items = pop_mark()
                else:
                    if len(stack) < n:
                        refuse(f"{pickle_name} on a stack of {len(stack)}")
                    items = stack[len(stack) - n:]
                    del stack[len(stack) - n:]
                push(_Node("tuple", items))
            elif op in _EMPTY_KINDS:
                push(_Node(_EMPTY_KINDS[op]))
            elif op == pickle.APPEND[0]:
                item = stack.pop()
                fill(stack[-1], ("list",), [item])
            elif op == pickle.APPENDS[0]:
                items = pop_mark()
                fill(stack[-1], ("list",), items)
            elif op == pickle.SETITEM[0]:
                item, key = stack.pop(), stack.pop()
                fill(stack[-1], ("dict", "OrderedDict"), [key, item])
            elif op == pickle.SETITEMS[0]:
                items = pop_mark()
                fill(stack[-1], ("dict", "OrderedDict"), items)
            elif op in (pickle.REDUCE[0], pickle.NEWOBJ[0]):
                args, func = stack.pop(), stack.pop()
                if func.kind != "global" or args.kind != "tuple":
                    refuse(f"{pickle_name} calls a {func.kind} with a {args.kind}")
                if op == pickle.REDUCE[0] and func.name not in _PICKLE_CALLABLES:
                    refuse(f"REDUCE calls {func.name}, which no checkpoint needs")
                if op == pickle.NEWOBJ[0] and not func.name.startswith("__torch__."):
                    refuse(f"NEWOBJ creates {func.name}; only TorchScript objects are created so")
                kind = ("OrderedDict" if func.name == "collections.OrderedDict"
                        else "object" if op == pickle.NEWOBJ[0] else "result")
                push(_Node(kind, [func, args]))
            elif op == pickle.BUILD[0]:
                state, target = stack.pop(), stack[-1]
                if target.built:
                    refuse("a second BUILD on one object")
                fill(target, ("object", "OrderedDict"), [state])
                target.built = True
            elif op == pickle.BINPERSID[0]:
                pid = stack.pop()
                if pid.kind != "tuple":
                    refuse(f"a persistent id that is a {pid.kind}, not a tuple")
                push(_Node("persistent", [pid]))
            elif op == pickle.PROTO[0]:
                if at != 0 or arg[0] > pickle.HIGHEST_PROTOCOL:
                    refuse(f"PROTO {arg[0]} where a pickle cannot have it")
            else:  # STOP
                if metastack or len(stack) != 1:
                    refuse("STOP with an unfinished stack")
                return pos
    except IndexError:  # a pop from an empty stack
        refuse(f"{pickle_name} on an empty stack")


_PICKLE_OP_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_TUPLE_SIZES = {pickle.EMPTY_TUPLE[0]: 0, pickle.TUPLE1[0]: 1, pickle.TUPLE2[0]: 2, pickle.TUPLE3[0]: 3,
                pickle.TUPLE[0]: None}  # None: up to the MARK
_EMPTY_KINDS = {pickle.EMPTY_LIST[0]: "list", pickle.EMPTY_DICT[0]: "dict", pickle.EMPTY_SET[0]: "set"}
_SCALAR_OPS = {op[0] for op in (pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.BININT, pickle.BININT1,
                                pickle.BININT2, pickle.BINFLOAT)}


def _zip_records(path: str) -> Dict[str, zipfile.ZipInfo]:
    """A zip checkpoint's records from its central directory, refused unless each is unencrypted,
    named once and inside the file, and all together no larger than the file."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except Exception as e:  # BadZipFile, struct.error, NotImplementedError, OSError, ...
        raise CheckpointError(f"not a readable zip archive ({error_line(e)})") from None
    records, total = {}, 0
    for info in infos:
        name = _describe(info.filename)
        if info.flag_bits & 1:
            raise CheckpointError(f"zip record {name} is encrypted")
        if info.filename in records:
            raise CheckpointError(f"zip record {name} appears twice")
        if info.header_offset + 30 + len(info.filename) + info.compress_size > size:
            raise CheckpointError(f"zip record {name} ({info.compress_size} bytes) lies outside the file")
        records[info.filename] = info
        total += info.compress_size
    if total > size:
        raise CheckpointError(f"its zip records add up to {total} bytes, more than the file's {size}")
    return records


def _check_stored(info: zipfile.ZipInfo):
    """torch writes the records it reads uncompressed; a compressed one is a bomb until read (1 GiB
    of zeros fits in a kilobyte). TorchScript's code records, which are never read, may be compressed."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CheckpointError(f"zip record {_describe(info.filename)} is compressed (method "
                              f"{info.compress_type}); torch stores the records it reads uncompressed")


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip record's local header (zipfile.structFileHeader)


def _read_record(f, info: zipfile.ZipInfo) -> torch.Tensor:
    """A stored record's bytes as a uint8 tensor, read straight into it (no zero-filling, no copy)
    and checked against its CRC-32."""
    _check_stored(info)
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"zip record {_describe(info.filename)} has no local header")
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    if f.read(name_length) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise CheckpointError(f"zip record {_describe(info.filename)}: its two names differ")
    f.seek(extra_length, os.SEEK_CUR)
    if info.file_size == 0 and info.CRC == 0:  # frombuffer's storage cannot be resized (grown) later
        return torch.frombuffer(bytearray(1), dtype=torch.uint8)[:0]
    data = torch.empty(info.file_size, dtype=torch.uint8)
    if f.readinto(data.numpy()) != info.file_size or zlib.crc32(data.numpy()) != info.CRC:
        raise CheckpointError(f"zip record {_describe(info.filename)} is truncated or corrupted (CRC-32)")
    return data


def _one_data_pickle(records: Dict[str, zipfile.ZipInfo]) -> str:
    """The name of the archive's <name>/data.pkl (its root pickle), refusing zero or several."""
    found = [n for n in records if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if len(found) != 1:
        raise CheckpointError(f"expected one <name>/data.pkl in the zip archive, found {len(found)}")
    return found[0]


def _view_problem(storage_numel: int, offset, size, stride) -> Optional[str]:
    """Why the strided view (offset, size, stride) of a storage of storage_numel elements is refused,
    or None: integer sizes, strides and offset, none negative; elements that never overlap (no
    stride 0: one stored row expanded into millions); every element inside the storage."""
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= _MAX_DIMS):
        return f"size and stride must be tuples of one length (at most {_MAX_DIMS})"
    if not all(type(v) is int for v in (offset, *size, *stride)):
        return "size, stride and offset must be integers"
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        return f"a negative size, stride or offset ({size}, {stride}, {offset})"
    if 0 in size:
        return None if offset <= storage_numel else f"offset {offset} beyond its storage of {storage_numel}"
    extent = 1  # elements spanned by the dimensions seen so far, smallest stride first
    for step, n in sorted((st, n) for n, st in zip(size, stride) if n > 1):
        if step < extent:
            return f"its elements overlap (size {size}, stride {stride})"
        extent += (n - 1) * step
    if offset + extent > storage_numel:
        return f"it reaches element {offset + extent} of a storage of {storage_numel}"
    return None


def _check_tensors(tensors, file_size: int):
    """Views checked (see _view_problem) and their bytes capped at _MAX_TENSOR_BYTES per file byte
    (distinct views of one storage count separately), so no file builds a model bigger than itself."""
    total = 0
    for name, t in tensors:
        if t.layout != torch.strided or t.device.type != "cpu":
            raise CheckpointError(f"tensor {name} is {t.layout} on {t.device}, not a dense CPU tensor")
        problem = _view_problem(t.untyped_storage().nbytes() // t.element_size(), t.storage_offset(),
                                tuple(t.shape), t.stride())
        if problem:
            raise CheckpointError(f"tensor {name}: {problem}")
        total += t.numel() * t.element_size()
    if total > _MAX_TENSOR_BYTES * file_size + (1 << 20):
        raise CheckpointError(f"its tensors hold {total:,} bytes, more than {_MAX_TENSOR_BYTES} x the "
                              f"file's {file_size:,}")


def _walk_loaded(obj) -> List[Tuple[str, torch.Tensor]]:
    """Every distinct tensor in what torch.load returned (dicts, lists, tuples, sets), with a name
    for messages; iterative, each container once, at most _MAX_NESTING deep."""
    found, seen, todo = [], set(), [(obj, "", 0)]
    while todo:
        x, name, depth = todo.pop()
        if not isinstance(x, (torch.Tensor, dict, list, tuple, set, frozenset)) or id(x) in seen:
            continue
        seen.add(id(x))
        if depth > _MAX_NESTING:
            raise CheckpointError(f"objects nested more than {_MAX_NESTING} deep")
        if isinstance(x, torch.Tensor):
            found.append((name or "(top level)", x))
        elif isinstance(x, dict):
            for key, value in x.items():
                label = f"{name}.{key}" if isinstance(key, str) and len(key) < 100 else f"{name}.<key>"
                todo += [(key, label, depth + 1), (value, label.lstrip("."), depth + 1)]
        else:
            todo += [(item, f"{name}[{i}]", depth + 1) for i, item in enumerate(x)]
    return found


def safe_torch_load(path: str):
    """torch.load(path, map_location="cpu", weights_only=True) behind the checks of this section:
    zip records (_zip_records) and the root pickle (scan_pickle) before, tensor views and total size
    (_check_tensors) after. For every file a user names: checkpoints to resume or evaluate, state
    dicts. Raises CheckpointError (a ValueError) "<path>: ..." for anything it cannot read; torch's
    legacy pre-1.6 format is refused (its storage records are sized by the file itself)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        size = os.path.getsize(path)
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                head = f.read(1 << 20)
            if head[:1] != pickle.PROTO:
                raise CheckpointError("not a torch checkpoint (neither a zip archive nor a pickle)")
            scan_pickle(head, "its first pickle")
            raise CheckpointError("not a zip archive: torch's legacy (pre-1.6) format, or not a torch "
                                  "checkpoint; re-save it with torch.save in a trusted environment")
        records = _zip_records(path)
        for info in records.values():  # torch.load reads every record of a torch.save file
            _check_stored(info)
        name = _one_data_pickle(records)
        with open(path, "rb") as f:
            scan_pickle(_read_record(f, records[name]).numpy().tobytes(), name)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            # torch names the global it refused on a later line ("... GLOBAL posix.system ...")
            reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
            raise CheckpointError(f"refused to unpickle it ({reason[:200]}); checkpoints are read as data "
                                  "only (torch.load(weights_only=True))") from None
        except Exception as e:
            raise CheckpointError(f"not a checkpoint torch can read ({error_line(e)})") from None
        _check_tensors(_walk_loaded(obj), size)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return obj


# ---- 9. SHA-256 verification of OpenAI's files ----

_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{}/{}"
# OpenAI publishes each file's SHA-256 as a directory of its download address (clip/clip.py, _MODELS)
OPENAI_SHA256 = {
    "RN50.pt": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101.pt": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4.pt": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16.pt": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64.pt": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
    "ViT-B-32.pt": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B-16.pt": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}


def verify_checkpoint(path: str) -> bool:
    """If path's file name is an official OpenAI one, check its SHA-256 (streamed, 1 MiB at a time).

    Returns True when verified, False when the name is not an official one; raises CheckpointError
    on a mismatch."""
    name = os.path.basename(path)
    expected = OPENAI_SHA256.get(name)
    if expected is None:
        return False
    digest = sha256(path)
    if digest != expected:
        raise CheckpointError(
            f"{path}: SHA-256 {digest} does not match OpenAI's published {expected} for "
            f"{name} ({os.path.getsize(path)} bytes read): the download is truncated or corrupted. "
            f"Re-download it from {_OPENAI_URL.format(expected, name)}, or pass verify=False if you "
            "renamed or converted the file on purpose.")
    return True


def sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_openai(path: str, verified: bool) -> bool:
    """One of OpenAI's checkpoints: by its official name, or renamed (by its SHA-256)."""
    return verified or os.path.basename(path) in OPENAI_SHA256 or sha256(path) in OPENAI_SHA256.values()
