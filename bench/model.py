"""Cost of the CILF-CIAE fusion Transformer per token mixer as the number of image tokens grows (CPU).

    python bench/model.py              # the README table, about 2-3 minutes on 2 cores
    python bench/model.py --quick      # N up to 784 only
    python bench/model.py --threads 1  # on a busy machine: one thread never waits for a descheduled peer

What is timed: one forward + backward of model.FusionTransformer alone (the part whose cost the paper's
"linear log complexity" claim is about), fed token tensors directly: g (B, E), P (B, N, E) on an
sqrt(N) x sqrt(N) grid, the K = 101 age-text embeddings (K, E), loss = f.sum(). Running a CLIP tower at
the resolution that gives N = 3136 tokens would dominate the time and hide the fusion's scaling.
B = 1, E = 512, the default fusion (depth 2, width 256, 4 heads, MLP ratio 4, cross-attention on),
float32, torch.set_num_threads(2) (--threads). Mixers: linear (kernelized linear attention, the default),
fourier (global filter, O(N log N)), softmax (SDPA, the quadratic baseline), none (global token only).

Each (mixer, N) runs in a fresh subprocess. Peak memory: the resident high-water mark (VmHWM, reset
through /proc/self/clear_refs just before the first forward + backward) minus the resident size before
it; the inputs and parameters are allocated before and not counted. Where the reset is not allowed,
getrusage's ru_maxrss is used and the output says so. Time: the fastest of the calls after that first
one (at least 3, more while under 2 s in all): on a shared machine the minimum is the least disturbed.
The exponent is the least-squares slope of log(time) and log(memory) against log(N) over
N >= 196 (at N = 49 fixed per-call costs dominate).

Parameter counts are of a full CILFCIAE on a small ViT CLIP (E 512, vision width 384, 6 layers,
patch 16; text width 256, 4 layers): image tower, text tower, fusion per mixer, feedback head.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for a run without `pip install -e .`

import peak_rss  # noqa: E402  (bench/peak_rss.py, beside this file)

B, E, K = 1, 512, 101
SIDES = (7, 14, 28, 56)  # N = 49, 196, 784, 3136
MIXERS = ("linear", "fourier", "softmax", "none")


def worker(mixer, side, threads):
    """One (mixer, grid side) case in this process; prints a JSON line."""
    import torch

    from model import CILFConfig, FusionTransformer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fusion = FusionTransformer(E, CILFConfig(mixer=mixer), grid_size=(14, 14))
    g, tokens = torch.randn(B, E), torch.randn(B, side * side, E)
    text = torch.nn.functional.normalize(torch.randn(K, E), dim=-1)

    def step():
        fusion.zero_grad(set_to_none=True)
        fusion(g, tokens, (side, side), text)[0].sum().backward()

    begun = peak_rss.start()
    exact = begun[0]
    step()
    rise_kib = peak_rss.rise_kib(begun)
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < 2.0 and len(times) < 20):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"mixer": mixer, "n": side * side, "ms": 1e3 * min(times),
                      "mb": rise_kib / 1024, "exact": exact}))


def run_case(mixer, side, threads):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--threads", str(threads),
                          "--worker", mixer, str(side)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs, ys):
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def parameter_counts():
    import torch

    import clip_loader
    from model import CILFCIAE, CILFConfig

    torch.manual_seed(0)
    clip = clip_loader.CLIP(E, 224, 6, 384, 16, 77, 49408, 256, 4, 4)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    model = CILFCIAE(clip, CILFConfig())
    rows = [("CLIP image tower (ViT, width 384, 6 layers)", count(clip.visual.parameters())),
            ("CLIP text tower (width 256, 4 layers)", count(model._text_params())),
            ("error-feedback head (R = 2, hidden 256)", count(model.feedback.parameters()))]
    for mixer in MIXERS:
        fusion = CILFCIAE(clip, CILFConfig(mixer=mixer, feedback_steps=0)).fusion
        rows.append((f"fusion, mixer {mixer} (depth 2, width 256)", count(fusion.parameters())))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="grid sides 7, 14, 28 only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--worker", nargs=2, metavar=("MIXER", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.threads)
        return
    sides = SIDES[:3] if args.quick else SIDES
    start = time.time()
    results = {m: [run_case(m, s, args.threads) for s in sides] for m in MIXERS}
    exact = all(r["exact"] for rs in results.values() for r in rs)
    print(f"Fusion forward+backward, B={B}, E={E}, depth 2, width 256, K={K} texts, "
          f"{args.threads} thread(s), float32 CPU")
    print(f"memory: {'VmHWM - VmRSS' if exact else 'ru_maxrss increase (upper bound)'} of the first call")
    print()
    header = "| mixer | " + " | ".join(f"N={s * s}" for s in sides) + " | time exponent | memory exponent |"
    print(header)
    print("|" + "---|" * (len(sides) + 3))
    for m, rs in results.items():
        cells = " | ".join(f"{r['ms']:.1f} ms, {r['mb']:.0f} MB" for r in rs)
        fit = [r for r in rs if r["n"] >= 196]
        t_exp = slope([r["n"] for r in fit], [r["ms"] for r in fit])
        m_exp = slope([r["n"] for r in fit], [max(r["mb"], 0.5) for r in fit])
        print(f"| {m} | {cells} | {t_exp:.2f} | {m_exp:.2f} |")
    print()
    print("| part | parameters |")
    print("|---|---|")
    for name, n in parameter_counts():
        print(f"| {name} | {n:,} |")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
