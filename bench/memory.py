"""Training memory of CILF-CIAE on OpenAI's CLIP sizes, known before a GPU is rented: the bytes autograd keeps
for backward per image, counted exactly on the CPU, plus the static bytes, and the largest batch that fits a
GPU of 24, 40 and 80 GB.

    python bench/memory.py                    # the table of bench/README.md#memory (tens of minutes on 2 cores)
    python bench/memory.py --models ViT-B/16 --precisions bf16 --json      # rows as a JSON list
    python bench/memory.py --models ViT-B/16 --precisions bf16 --measure-cuda 64   # on a GPU: predicted vs
                                                                                    # torch.cuda.max_memory_allocated

What is counted, per (model, resolution, precision, checkpointing) row: the model train.py trains (CILFCIAE
with a real run's defaults, as with --clip FILE: image tower trained, text tower frozen with its prompt
embeddings cached, fusion width 256 x 2 blocks, feedback on) around clip_loader.CLIP(**config) built from the
published sizes with random weights. One forward pass and model.loss run under
torch.autograd.graph.saved_tensors_hooks (kept_bytes): every tensor autograd saves for backward is noted by its
storage, each storage once, and those still alive when the loss is returned are summed (a branch whose graph
was dropped frees what it saved). The model's own parameters and buffers are left out: they are static.
  activation_bytes_per_image = (kept at batch b2 - kept at batch b1) / (b2 - b1)
  static_bytes = parameters and buffers + gradients + AdamW's two moments (of the trained parameters)
                 + what is kept whatever the batch (kept at b1 - b1 x per image: under bf16 autocast the
                 bf16 copies of the weights)
  recomputed_bytes_per_image = under checkpointing, the largest checkpointed block's own activations (counted
                 in the run without checkpointing): backward forms them again, one block at a time
  max_batch[N GB] = floor((N GiB - static_bytes) / (activation_bytes_per_image + recomputed_bytes_per_image))
The attention kernel is the one torch picks on the CPU: its flash-attention kernel, which keeps q, k, v, the
output and the log-sum-exp, as flash and memory-efficient attention do on a GPU; --attention math counts the
math kernel, which also keeps each layer's attention matrix. Not counted: the other transients of backward
(the gradients of the activations being formed), the CUDA context and the allocator's fragmentation, and
what CPU and CUDA autocast cast differently; --measure-cuda shows the difference on the GPU.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, without `pip install -e .`
import clip_loader  # noqa: E402
import train  # noqa: E402
from eval import autocast  # noqa: E402
from model import CILFCIAE  # noqa: E402

# OpenAI's published sizes (the shapes clip_loader.build_model infers from their checkpoints)
TEXT_B = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
TEXT_L = dict(TEXT_B, transformer_width=768, transformer_heads=12)
MODELS = {
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     **TEXT_B),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     **TEXT_L),
    "ViT-L/14@336": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                         vision_patch_size=14, **TEXT_L),
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, **TEXT_B),
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
GPU_GB = (24, 40, 80)
ATTENTION = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def kept_bytes(run, exclude=(), blocks=()):
    """(bytes autograd keeps for backward after run(), the part of them saved inside each of blocks, run()'s
    result). Each tensor saved for backward is noted by its storage (data pointer); a storage counts once
    however many tensors view it, and only if it is still alive when run() returns (a freed storage's address
    may be reused: the later one is the one noted). Storages of the tensors in exclude (a model's parameters)
    are not counted."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    noted = {}   # data pointer -> (weak reference, bytes, index of the block that saved it or None)
    inside = [None]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            noted[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes(), inside[0])
        # kept as autograd keeps it; an alias without grad_fn, since an output saved as itself would hold its own
        # node (a reference cycle that keeps a dropped branch alive)
        return tensor.detach()

    def enter(i):
        return lambda module, args: inside.__setitem__(0, i)

    hooks = [hook for i, block in enumerate(blocks)
             for hook in (block.register_forward_pre_hook(enter(i)),
                          block.register_forward_hook(lambda module, args, output: inside.__setitem__(0, None)))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            result = run()
    finally:
        for hook in hooks:
            hook.remove()
    alive = [(size, block) for ref, size, block in noted.values() if not ref.expired()]
    return (sum(size for size, _ in alive), [sum(size for size, b in alive if b == i) for i in range(len(blocks))],
            result)


def per_image_and_intercept(kept_at, batches):
    """(bytes per image, bytes at batch 0) of the line through kept_at(b) at the two batch sizes."""
    (b1, b2), (k1, k2) = batches, [kept_at(b) for b in batches]
    per_image = (k2 - k1) / (b2 - b1)
    return per_image, k1 - b1 * per_image


def checkpointed_blocks(clip):
    """The residual blocks CLIP.set_grad_checkpointing checkpoints, in both towers."""
    visual = clip.visual
    image_blocks = ([*visual.layer1, *visual.layer2, *visual.layer3, *visual.layer4]
                    if isinstance(visual, clip_loader.ModifiedResNet) else [*visual.transformer.resblocks])
    return image_blocks + [*clip.transformer.resblocks]


def build_model(name, device="cpu"):
    """CILFCIAE with a real run's defaults (train.py --clip FILE) around a random CLIP of the named size."""
    options = train.parse_args(["--clip", "memory-bench.pt"])
    torch.manual_seed(0)
    model = CILFCIAE(clip_loader.CLIP(**MODELS[name]), train.build_config(options)).to(device).train()
    model.text_embeddings()   # a frozen text tower runs once per run (cached), not per step
    return model


def training_forward(model, batch, precision, device):
    """A function that runs what a training step keeps for backward: forward and model.loss."""
    resolution = model.clip.visual.input_resolution
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    ages = torch.rand(batch, device=device) * 100

    def run():
        with autocast(torch.device(device), PRECISIONS[precision]):
            loss, _ = model.loss(model(images), ages)
        return loss
    return run


def static_bytes(model):
    """Parameters and buffers, plus a gradient and AdamW's two moments for every trained parameter."""
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return tensors + 3 * trained


def max_batch(static, per_image, gigabytes):
    return max(0, math.floor((gigabytes * 2 ** 30 - static) / per_image))


def count_rows(model, name, precision, checkpointing, batches):
    """The table's rows of one model and precision, one per checkpointing setting (False, True). The run
    without checkpointing is always counted: under checkpointing, backward recomputes one block at a time,
    and the largest block's activations (counted in that run) come on top of what is kept."""
    params, blocks = [*model.parameters(), *model.buffers()], checkpointed_blocks(model.clip)

    def count(on):
        model.clip.set_grad_checkpointing(on)
        counts = {b: kept_bytes(training_forward(model, b, precision, "cpu"), params, () if on else blocks)[:2]
                  for b in batches}
        per_image, intercept = per_image_and_intercept(lambda b: counts[b][0], batches)
        block = 0 if on else max(per_image_and_intercept(lambda b: counts[b][1][i], batches)[0]
                                 for i in range(len(blocks)))
        return round(per_image), static_bytes(model) + round(intercept), round(block)

    off = count(False)
    rows = []
    for on in checkpointing:
        per_image, static, _ = count(True) if on else off
        recomputed = off[2] if on else 0
        rows.append({"model": name, "resolution": model.clip.visual.input_resolution, "precision": precision,
                     "checkpointing": on, "activation_bytes_per_image": per_image, "static_bytes": static,
                     "recomputed_bytes_per_image": recomputed,
                     "max_batch": {f"{gb}GB": max_batch(static, per_image + recomputed, gb) for gb in GPU_GB}})
    return rows


def measure_cuda(model, row, batch):
    """Two real training steps (forward, loss, backward, clipping, AdamW) at batch on the GPU with the row's
    precision and checkpointing: (the prediction static + batch x (per image + recomputed), the second step's
    torch.cuda.max_memory_allocated). The model comes back to the CPU."""
    model.clip.set_grad_checkpointing(row["checkpointing"])
    model.cuda()
    optimizer = torch.optim.AdamW(model.param_groups(1e-5, 1e-4, 0.05), fused=True)
    run = training_forward(model, batch, row["precision"], "cuda")
    for step in range(2):
        if step == 1:   # AdamW's moments exist from the first step on
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        run().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    del optimizer, run
    model.cpu()
    torch.cuda.empty_cache()
    per_image = row["activation_bytes_per_image"] + row["recomputed_bytes_per_image"]
    return row["static_bytes"] + batch * per_image, measured


def print_table(rows, args):
    mib = lambda n: f"{n / 2 ** 20:.1f}"
    print("| model | res | precision | checkpointing | MiB kept per image | + MiB recomputed | static GiB | "
          + " | ".join(f"max batch {gb} GB" for gb in GPU_GB) + " |")
    print("|---|---:|---|---|---:|---:|---:|" + "---:|" * len(GPU_GB))
    for r in rows:
        print(f"| {r['model']} | {r['resolution']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | "
              f"{mib(r['activation_bytes_per_image'])} | {mib(r['recomputed_bytes_per_image'])} | "
              f"{r['static_bytes'] / 2 ** 30:.2f} | " + " | ".join(str(r["max_batch"][f"{gb}GB"]) for gb in GPU_GB)
              + " |")
    print(f"counted on the CPU ({args.attention} attention kernel) at batches {args.batches[0]} and "
          f"{args.batches[1]}; kept = saved for backward; recomputed = the largest checkpointed block's "
          f"activations, formed again in backward; static = weights, buffers, gradients, AdamW moments and "
          f"batch-independent saved tensors; max batch = (N GiB - static) / (kept + recomputed)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="CLIP.set_grad_checkpointing (train.py --grad-checkpoint)")
    p.add_argument("--batches", nargs=2, type=int, default=[1, 2], help="the two batch sizes counted")
    p.add_argument("--attention", default="flash", choices=list(ATTENTION), help="CPU attention kernel counted")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--measure-cuda", type=int, default=None, metavar="BATCH", help="on a GPU: also run two "
                   "training steps at BATCH per row and print the prediction beside max_memory_allocated")
    args = p.parse_args(argv)
    if not 0 < args.batches[0] < args.batches[1]:
        p.error(f"--batches needs 0 < b1 < b2, got {args.batches}")
    if args.measure_cuda is not None and not torch.cuda.is_available():
        p.error("--measure-cuda needs a CUDA GPU")
    torch.set_num_threads(args.threads)
    start, rows = time.time(), []
    for name in args.models:
        model = build_model(name)
        for precision in args.precisions:
            with sdpa_kernel(ATTENTION[args.attention]):
                new_rows = count_rows(model, name, precision, [c == "on" for c in args.checkpointing], args.batches)
            print(f"{name} {precision} counted ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
            for row in new_rows if args.measure_cuda is not None else ():
                predicted, measured = measure_cuda(model, row, args.measure_cuda)
                row["cuda"] = {"batch": args.measure_cuda, "predicted_bytes": predicted, "measured_bytes": measured}
                print(f"{name} {precision} checkpointing {'on' if row['checkpointing'] else 'off'}, batch "
                      f"{args.measure_cuda} on {torch.cuda.get_device_name()}: predicted {predicted / 2 ** 30:.2f} "
                      f"GiB, max_memory_allocated {measured / 2 ** 30:.2f} GiB ({measured / predicted:.2f}x)",
                      flush=True)
            rows += new_rows
        del model
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, args)


if __name__ == "__main__":
    main()
