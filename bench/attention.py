"""Scaling benchmark of the token mixers in linear_attention.py against softmax attention, on the CPU.

    python bench/attention.py                    # the README table (about 4 minutes on 2 busy cores)
    python bench/attention.py --max-n 4096       # a quick look

B=1, H=8, D=Dv=64 (model width 512), float32, torch.set_num_threads(2), inference (no_grad). Methods:
linear (linear_attention), linear causal (chunk 64), fourier (FourierMixer on a sqrt(N) x sqrt(N) grid of
width 512), SDPA softmax (F.scaled_dot_product_attention) and materialized softmax
(softmax(Q K^T / sqrt(D)) V with the N x N scores in memory).

Every (method, N) runs in a fresh subprocess. Peak memory is the extra resident memory of the first call:
the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs just before the call) minus the
resident size (VmRSS) before it; inputs are allocated before and not counted, the output is. Where the
reset is not allowed, getrusage's ru_maxrss is used instead and the output says so. Time is the median of
the calls after that first one (a single call is used when it takes over 5 s). The children run with
OMP_WAIT_POLICY=PASSIVE unless it is set: on a machine shared with other jobs, spinning OpenMP threads
otherwise wait out scheduler time slices at every parallel region (x7 on a 1k-token call here).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import peak_rss  # bench/peak_rss.py, beside this file

B, H, D = 1, 8, 64
THREADS = 2
MATERIALIZED_LIMIT = 8e9           # bytes of the (B, H, N, N) float32 scores above which it is not run
BASE_SIZES = (256, 1024, 4096, 16384)
LONG = 65536                       # only the (log-)linear methods
LINEAR_METHODS = ("linear", "linear causal", "fourier")
METHODS = LINEAR_METHODS + ("SDPA softmax", "materialized softmax")


def make_case(method, n):
    """A zero-argument callable running `method` at sequence length n."""
    import torch
    import torch.nn.functional as F
    import linear_attention as la

    g = torch.Generator().manual_seed(0)
    if method == "fourier":
        side = math.isqrt(n)
        mixer = la.FourierMixer(H * D, (side, side), num_global_tokens=0)
        x = torch.randn(B, n, H * D, generator=g)
        return lambda: mixer(x)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    if method == "linear":
        return lambda: la.linear_attention(q, k, v)
    if method == "linear causal":
        return lambda: la.linear_attention(q, k, v, causal=True)
    if method == "SDPA softmax":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if method == "materialized softmax":
        return lambda: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1) @ v
    raise ValueError(method)


def run_case(method, n):
    """Child process: one JSON line with the median time (s), peak extra memory (bytes) and the method."""
    import torch
    torch.set_num_threads(THREADS)
    with torch.no_grad():
        make_case(method, 256)()                          # load kernels and libraries before measuring
        fn = make_case(method, n)
        begun = peak_rss.start()
        how = "VmHWM" if begun[0] else "ru_maxrss"
        start = time.perf_counter()
        out = fn()
        first = time.perf_counter() - start
        peak = peak_rss.rise_kib(begun)
        del out
        times = [first]
        if first < 5:
            times = []
            for _ in range(max(3, min(15, math.ceil(1.0 / first)))):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    print(json.dumps(dict(time=statistics.median(times), runs=len(times), peak=max(peak, 0) * 1024, how=how)))


def fit_exponent(results, method, sizes, key="time"):
    """Least-squares slope of log(key) against log(N) over the sizes that ran."""
    pts = [(math.log(n), math.log(results[method, n][key])) for n in sizes if (method, n) in results]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def fmt_time(t):
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def fmt_mem(b):
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-n", type=int, default=LONG, help="largest sequence length (default 65536)")
    ap.add_argument("--case", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        return run_case(args.case[0], int(args.case[1]))

    methods = METHODS
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sizes = [n for n in BASE_SIZES + (LONG,) if n <= args.max_n]
    results, how = {}, set()
    load0 = os.getloadavg()[0]                     # other processes on the machine skew the timings
    for method in methods:
        for n in sizes:
            if n == LONG and method not in LINEAR_METHODS:
                continue
            if method == "materialized softmax" and B * H * n * n * 4 > MATERIALIZED_LIMIT:
                continue
            proc = subprocess.run([sys.executable, __file__, "--case", method, str(n)], capture_output=True,
                                  text=True, env=env,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if proc.returncode:
                print(f"{method} N={n} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[method, n] = json.loads(proc.stdout.strip().splitlines()[-1])
            how.add(results[method, n]["how"])
            print(f"  {method:22s} N={n:6d}  {fmt_time(results[method, n]['time']):>10s}  "
                  f"{fmt_mem(results[method, n]['peak']):>10s}", file=sys.stderr, flush=True)

    import torch
    print(f"# torch {torch.__version__}, CPU ({os.cpu_count()} cores), {THREADS} threads, B={B} H={H} D=Dv={D}, "
          f"float32, no_grad, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"# time: median wall time per call; memory: extra peak resident memory of one call, measured by "
          f"{' and '.join(sorted(how))} in a fresh subprocess (output counted, inputs not); '-' = not run")
    header = "| method | " + " | ".join(f"N={n}" for n in sizes) + " | exponent 1k..16k |"
    for title, key, fmt in (("time", "time", fmt_time), ("peak memory", "peak", fmt_mem)):
        print(f"\n{title}\n\n{header}\n|" + "---|" * (len(sizes) + 2))
        for m in methods:
            cells = [fmt(results[m, n][key]) if (m, n) in results else "-" for n in sizes]
            exp = fit_exponent(results, m, (1024, 4096, 16384), key)
            print(f"| {m} | " + " | ".join(cells) + f" | {'' if math.isnan(exp) else f'{exp:.2f}'} |")
    print("\ntime / SDPA softmax time\n\n" + "| method | " + " | ".join(f"N={n}" for n in sizes) + " |\n|"
          + "---|" * (len(sizes) + 1))
    for m in methods:
        cells = [f"{results[m, n]['time'] / results['SDPA softmax', n]['time']:.3f}"
                 if (m, n) in results and ("SDPA softmax", n) in results else "-" for n in sizes]
        print(f"| {m} | " + " | ".join(cells) + " |")

    print("\ngoals")
    if all(("linear", n) in results for n in (1024, 4096, 16384)):
        exp = fit_exponent(results, "linear", (1024, 4096, 16384))
        print(f"- linear time exponent over 1k..16k = {exp:.2f} (goal <= 1.15): {'MET' if exp <= 1.15 else 'MISSED'}")
    else:
        print("- linear time exponent over 1k..16k: not measured (needs N = 1k, 4k and 16k)")
    n = 16384
    if ("linear", n) in results and ("SDPA softmax", n) in results:
        r = results["linear", n]["time"] / results["SDPA softmax", n]["time"]
        print(f"- at N=16k linear takes {100 * r:.2f}% of SDPA softmax's time (goal <= 5%): "
              f"{'MET' if r <= 0.05 else 'MISSED'}")
    if ("linear", n) in results:
        if ("materialized softmax", n) in results:
            ref, what = results["materialized softmax", n]["peak"], "measured"
        else:
            ref = B * H * n * n * 4
            what = "not run; lower bound = one N x N float32 score matrix per head"
        r = results["linear", n]["peak"] / ref
        print(f"- at N=16k linear's peak memory {fmt_mem(results['linear', n]['peak'])} is {100 * r:.2f}% of "
              f"materialized softmax's {fmt_mem(ref)} ({what}) (goal <= 2%): {'MET' if r <= 0.02 else 'MISSED'}")
        m4 = 4096
        if ("materialized softmax", m4) in results and ("linear", m4) in results:
            r4 = results["linear", m4]["peak"] / results["materialized softmax", m4]["peak"]
            print(f"  (at N=4k, both measured: {100 * r4:.2f}%)")


if __name__ == "__main__":
    main()
