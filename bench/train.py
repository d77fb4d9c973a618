"""Training throughput and peak memory of a full CILF-CIAE training step, per token mixer (CPU; GPU column
filled when run with --devices cpu cuda on a CUDA machine).

    python bench/train.py                      # the README table: about 3-5 minutes on 2 CPU cores
    python bench/train.py --devices cpu cuda   # on a GPU machine: fills the GPU columns (bf16 autocast)
    python bench/train.py --devices cuda --backbones ViT-B/16 --gpu-batch 64   # the GPU check's figure
    python bench/train.py --host-syncs         # ViT-B/16 step with the loss read once per step vs per micro-batch
    python bench/train.py --feedback-designs   # the anchored feedback's cost: reread vs anchored, step and eval

What is timed: exactly train.py's step (forward under autocast on CUDA / fp32 on the CPU, model.loss
with every part on, backward, gradient clipping, AdamW) on random images, for two backbones, both random
weights, each with train.py's defaults:
  demo     exactly `python train.py`'s model: train.DEMO_CLIP (ViT, embed 64, res 32, patch 8, 3 layers
           width 96; text tower 1 x 64, trained), fusion width 64, 4 heads, depth 2; batch 64
  ViT-B/16 OpenAI's ViT-B/16 shape (embed 512, res 224, patch 16, 12 layers width 768; text 12 x 512,
           frozen: prompt embeddings cached) with a real run's defaults (fusion width 256, 4 heads,
           depth 2); batch 8
Images per second = batch / median step time over the timed steps (after one untimed warm-up step).
Peak memory, CPU: the resident high-water mark (VmHWM, reset through /proc/self/clear_refs before the
warm-up step) minus the resident size before it: activations, gradients, AdamW state (model weights and
inputs excluded). Where the reset is not allowed, ru_maxrss is used and the output says so. GPU:
torch.cuda.max_memory_allocated over the same steps, minus what was allocated before.
Each (backbone, mixer, device) runs in a fresh subprocess with torch.set_num_threads(2).

--host-syncs: the ViT-B/16 step (linear mixer) as train.py runs it, its loss parts and summed error
read on the host once per optimizer step ("per step"), against the reading earlier versions did after
every micro-batch, the loss parts' .tolist() and float(error sum) ("per micro-batch"; one micro-batch per
step here, so two reads against one). On a CPU a read costs no waiting (nothing runs ahead); on a GPU each
read stalls the queue of kernels. Cases alternate, each in a fresh subprocess, ROUNDS times.

--feedback-designs: the cost of --feedback-design anchored (one more forward of the frozen pretrained image
tower, and a wider feedback query) against reread, on both backbones (linear mixer): the training step's
median time and the median time of one forward pass in eval mode without gradients (what eval.py runs per
batch), each over the timed steps. Cases alternate, each in a fresh subprocess, ROUNDS times.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for a run without `pip install -e .`

import peak_rss  # noqa: E402  (bench/peak_rss.py, beside this file)

THREADS = 2
MIXERS = ("linear", "fourier", "softmax", "none")
VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)
# backbone -> (batch, timed steps on CPU, timed steps on GPU)
BACKBONES = {"demo": (64, 5, 20), "ViT-B/16": (8, 2, 20)}
# --host-syncs: when a step reads its loss parts and error on the host ("none": not at all, the table above)
HOST_SYNCS = ("none", "per step", "per micro-batch")
FEEDBACK_DESIGNS = ("reread", "anchored")   # --feedback-designs: the designs compared
ROUNDS = 3


def worker(backbone, mixer, device_name, batch, syncs="none", design="reread"):
    """One (backbone, mixer, device, batch) case in this process, the host reading its loss as `syncs`
    says (HOST_SYNCS), with --feedback-design `design`; prints a JSON line."""
    import torch

    import clip_loader
    import train
    from eval import autocast, autocast_dtype, configure_device
    from model import CILFCIAE

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    device = torch.device(device_name)
    configure_device(device)   # TF32 and cuDNN autotuning on a GPU, as train.py
    batch, (_, cpu_steps, gpu_steps) = int(batch), BACKBONES[backbone]
    model_options = ["--mixer", mixer, "--feedback-design", design]
    if backbone == "demo":   # exactly the demo's model: its CLIP and train.py's demo defaults
        options = train.parse_args(model_options)
        clip_model = train.build_clip(options)
    else:                    # a real run's defaults (as with --clip ViT-B-16.pt), on random weights
        options = train.parse_args([*model_options, "--clip", "ViT-B-16.pt"])
        clip_model = clip_loader.CLIP(**VIT_B16)
    config = train.build_config(options)
    model = CILFCIAE(clip_model, config).to(device).train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-5, 1e-4, 0.05), fused=device.type == "cuda")
    resolution = clip_model.visual.input_resolution
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    ages = torch.rand(batch, device=device) * 100
    amp_dtype = autocast_dtype(device)
    model.text_embeddings()   # a frozen text tower runs once per run, not per step: keep that out

    def step():
        with autocast(device, amp_dtype):
            out = model(images)
            loss, parts = model.loss(out, ages)
        loss.backward()
        if syncs != "none":   # train.train_epoch's bookkeeping: the loss parts and the summed error
            values = torch.stack([loss.detach()] + [parts[k].detach() for k in sorted(parts)]).double()
            error = (out.age.detach().float() - ages).abs().sum().double()
            if syncs == "per micro-batch":
                values.tolist(), float(error)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.clamp_logit_scale()
        optimizer.zero_grad(set_to_none=True)
        if syncs == "per step":
            torch.cat([values, error.view(1)]).tolist()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before, exact = torch.cuda.memory_allocated(), True
    else:
        begun = peak_rss.start()
        exact = begun[0]
    step()
    times = []
    for _ in range(gpu_steps if device.type == "cuda" else cpu_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        peak_mb = peak_rss.rise_kib(begun) / 1024
    print(json.dumps({"backbone": backbone, "mixer": mixer, "device": device.type, "batch": batch, "syncs": syncs,
                      "design": design, "images_per_s": batch / statistics.median(times),
                      "step_s": statistics.median(times), "eval_forward_s": eval_forward_seconds(model, images, device),
                      "peak_mb": peak_mb, "exact": exact}))


def eval_forward_seconds(model, images, device):
    """Median seconds of one forward pass in eval mode without gradients (after one untimed), as eval.py runs."""
    import torch

    from eval import autocast, autocast_dtype
    model.eval()
    times = []
    with torch.no_grad(), autocast(device, autocast_dtype(device)):
        for _ in range(4):
            t = time.perf_counter()
            model(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def run_case(backbone, mixer, device, batch, syncs="none", design="reread"):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", backbone, mixer, device,
                          str(batch), syncs, design], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{backbone} / {mixer} / {device} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"], help="devices to measure")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    p.add_argument("--gpu-batch", type=int, default=None, help="batch on CUDA for every backbone (default: the "
                   "CPU's, demo 64 and ViT-B/16 8)")
    p.add_argument("--host-syncs", action="store_true", help="time the ViT-B/16 step with the loss read on the "
                   "host once per step against once per micro-batch (instead of the table)")
    p.add_argument("--feedback-designs", action="store_true", help="time the training step and the eval forward "
                   "of --feedback-design reread against anchored on both backbones (instead of the table)")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)   # internal: one case per subprocess
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    if args.host_syncs:
        return compare_host_syncs(args.devices)
    if args.feedback_designs:
        return compare_feedback_designs(args.devices, args.backbones)
    start = time.time()
    results = {}
    for backbone in args.backbones:
        for mixer in args.mixers:
            for device in args.devices:
                batch = args.gpu_batch if device == "cuda" and args.gpu_batch else BACKBONES[backbone][0]
                results[backbone, mixer, device] = run_case(backbone, mixer, device, batch)
    cell = lambda r, key, fmt: format(r[key], fmt) if r else "-"
    print(f"{'backbone':<10}{'mixer':<9}{'CPU batch':>10}{'CPU img/s':>10}{'CPU peak MiB':>14}"
          f"{'GPU batch':>10}{'GPU img/s':>10}{'GPU peak MiB':>14}")
    for backbone in args.backbones:
        for mixer in args.mixers:
            cpu, gpu = results.get((backbone, mixer, "cpu")), results.get((backbone, mixer, "cuda"))
            print(f"{backbone:<10}{mixer:<9}{cell(cpu, 'batch', 'd'):>10}{cell(cpu, 'images_per_s', '.1f'):>10}"
                  f"{cell(cpu, 'peak_mb', '.0f'):>14}{cell(gpu, 'batch', 'd'):>10}"
                  f"{cell(gpu, 'images_per_s', '.1f'):>10}{cell(gpu, 'peak_mb', '.0f'):>14}")
    exact = all(r["exact"] for r in results.values())
    print(f"full training step (forward, loss, backward, clip, AdamW), {THREADS} CPU threads, float32 on the CPU, "
          f"bf16 autocast on CUDA; peak = {'VmHWM - VmRSS' if exact else 'ru_maxrss increase (upper bound)'} "
          f"on the CPU, max_memory_allocated on CUDA; '-' = not run. {time.time() - start:.0f} s")


def compare_host_syncs(devices):
    """The --host-syncs table: median images/s of the ViT-B/16 step over ROUNDS alternating runs per case."""
    start, rates = time.time(), {}
    for _ in range(ROUNDS):
        for device in devices:
            for syncs in HOST_SYNCS[1:]:
                result = run_case("ViT-B/16", "linear", device, BACKBONES["ViT-B/16"][0], syncs)
                rates.setdefault((device, syncs), []).append(result["images_per_s"])
    print(f"{'device':<8}{'loss read on the host':<24}{'img/s (median)':>16}{'runs':>24}")
    for (device, syncs), values in rates.items():
        print(f"{device:<8}{syncs:<24}{statistics.median(values):>16.2f}{' '.join(f'{v:.2f}' for v in values):>24}")
    print(f"ViT-B/16 shape, linear mixer, batch {BACKBONES['ViT-B/16'][0]}, {THREADS} threads, {ROUNDS} alternating "
          f"rounds of a fresh process each. {time.time() - start:.0f} s")


def compare_feedback_designs(devices, backbones):
    """The --feedback-designs table: median training-step and eval-forward seconds per (backbone, design) over
    ROUNDS alternating runs, and anchored's ratio to reread."""
    start, runs = time.time(), {}
    for _ in range(ROUNDS):
        for device in devices:
            for backbone in backbones:
                for design in FEEDBACK_DESIGNS:
                    result = run_case(backbone, "linear", device, BACKBONES[backbone][0], design=design)
                    runs.setdefault((device, backbone, design), []).append(result)
    median = lambda key, case: statistics.median(r[key] for r in runs[case])
    print(f"{'device':<8}{'backbone':<10}{'batch':>6}{'design':>10}{'train step (s)':>16}{'eval forward (s)':>18}"
          f"{'step x':>8}{'eval x':>8}")
    for (device, backbone, design) in runs:
        base = (device, backbone, FEEDBACK_DESIGNS[0])
        step, forward = median("step_s", (device, backbone, design)), median("eval_forward_s", (device, backbone, design))
        print(f"{device:<8}{backbone:<10}{BACKBONES[backbone][0]:>6}{design:>10}{step:>16.3f}{forward:>18.3f}"
              f"{step / median('step_s', base):>8.2f}{forward / median('eval_forward_s', base):>8.2f}")
    print(f"linear mixer, {THREADS} threads, median over {ROUNDS} alternating rounds of a fresh process each (each "
          f"the median of its timed steps). {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
