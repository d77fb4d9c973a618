"""clip_loader against OpenAI's reference code on the same weights: speed, tokenizer throughput, memory.

    python bench/clip.py                 # ViT-B/16-shaped random weights, CPU, 2 threads, ~3-5 minutes
    python bench/clip.py --repeats 5     # more timed repeats

Times are medians over repeats (the parity check before them is the warm-up), alternating reference
and ours each repeat so that load from other processes falls on both sides alike. Peak memory is each side's peak resident set
(VmHWM) in a fresh subprocess that imports, loads the same state-dict file, runs one encode_image
batch and one encode_text batch; tracemalloc cannot see torch's allocations, RSS can. The reference
side is OpenAI's clip.model.CLIP built in float32 with load_state_dict (its own build_model would cast
to fp16). Needs the test extra (pip install -e ".[test]") for the reference package.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

# this file is named clip.py, so its folder (sys.path[0]) would shadow OpenAI's clip package
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
warnings.filterwarnings("ignore")  # clip-anytorch imports pkg_resources

VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)
NOUNS = ["man", "woman", "person", "child", "boy", "girl", "teenager", "adult", "senior", "baby"]
DETAILS = ["with red hair", "with grey hair", "smiling", "wearing glasses", "in a garden", "outdoors",
           "with a beard", "looking sad", "in black and white", "under bright light"]


def age_prompts():
    """10,000 distinct plain prompts, the kind CILF-CIAE feeds the text tower."""
    return [f"a photo of a {age} year old {noun} {detail}." for age in range(100) for noun in NOUNS
            for detail in DETAILS]


def mixed_prompts():
    """10,000 distinct prompts with accents, entities and emoji: the tokenizer's full clean-up path."""
    extra = ["café", "naïve", "&amp;", "😀", "日本", "ÉCOLE", "“quoted”"]
    return [f"{p} {extra[i % len(extra)]}" for i, p in enumerate(age_prompts())]


def load_side(side, path):
    if side == "reference":
        import clip.model
        model = clip.model.CLIP(**VIT_B16)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    import clip_loader
    return clip_loader.load(path)[0]


def peak_rss_mib():
    """This process's peak resident set. Linux's VmHWM starts afresh at exec; ru_maxrss would carry
    over the parent's peak across fork + exec, so it is only the fallback elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(side, path):
    """Child process: peak RSS of importing, loading and one batch of each encoder."""
    torch.set_num_threads(2)
    import clip  # noqa: F401  (both sides import the same libraries, so baselines match)
    import clip_loader
    base = peak_rss_mib()
    model = load_side(side, path)
    with torch.no_grad():
        model.encode_image(torch.randn(8, 3, 224, 224))
        model.encode_text(clip_loader.tokenize([f"a photo of a {a} year old person." for a in range(101)]))
    print(json.dumps({"base_mib": base, "peak_mib": peak_rss_mib()}))


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    parser.add_argument("--memory", choices=["reference", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        return measure_memory(args.memory, args.weights)

    torch.set_num_threads(2)
    import clip
    import clip.model
    import clip_loader

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vit_b16_random.pt")
        torch.manual_seed(0)
        torch.save(clip.model.CLIP(**VIT_B16).state_dict(), path)
        models = {side: load_side(side, path) for side in ("reference", "ours")}

        image = torch.randn(8, 3, 224, 224)
        text = clip.tokenize([f"a photo of a {a} year old person." for a in range(101)])
        with torch.no_grad():
            diff_image = (models["ours"].encode_image(image) - models["reference"].encode_image(image)).abs().max()
            diff_text = (models["ours"].encode_text(text) - models["reference"].encode_text(text)).abs().max()
            for name, run in (("encode_image, batch 8 (s)", lambda m: m.encode_image(image)),
                              ("encode_text, 101 prompts (s)", lambda m: m.encode_text(text))):
                times = {"reference": [], "ours": []}
                for _ in range(args.repeats):
                    for side, model in models.items():
                        times[side].append(timed(lambda: run(model)))
                rows.append((name, statistics.median(times["reference"]), statistics.median(times["ours"])))
        del models

        for label, prompts in (("plain", age_prompts()), ("mixed", mixed_prompts())):
            assert len(set(prompts)) == 10_000
            # fresh tokenizers (built outside the timing): word caches start cold, as in a new process
            import clip.clip
            import clip.simple_tokenizer
            clip.clip._tokenizer = clip.simple_tokenizer.SimpleTokenizer()
            clip_loader._default_tokenizer.cache_clear()
            clip_loader._default_tokenizer()
            tokenize = {"reference": clip.tokenize, "ours": clip_loader.tokenize}
            cold = {side: timed(lambda: fn(prompts)) for side, fn in tokenize.items()}
            warm = {side: statistics.median(timed(lambda: fn(prompts)) for _ in range(3))
                    for side, fn in tokenize.items()}
            rows.append((f"tokenize(), 10k {label} prompts, cold (prompts/s)",
                         len(prompts) / cold["reference"], len(prompts) / cold["ours"]))
            rows.append((f"tokenize(), 10k {label} prompts, warm (prompts/s)",
                         len(prompts) / warm["reference"], len(prompts) / warm["ours"]))
        assert torch.equal(clip.tokenize(age_prompts()), clip_loader.tokenize(age_prompts()))

        memory = {}
        for side in ("reference", "ours"):
            out = subprocess.run([sys.executable, __file__, "--memory", side, "--weights", path],
                                 check=True, capture_output=True, text=True).stdout
            memory[side] = json.loads(out.strip().splitlines()[-1])

    print(f"ViT-B/16-shaped random weights, float32, CPU, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}; max |ours - reference|: image {diff_image:.1e}, text {diff_text:.1e}")
    print(f"| {'measure':<58} | {'reference':>10} | {'ours':>10} | {'ours/ref':>8} |")
    print(f"|{'-' * 60}|{'-' * 12}|{'-' * 12}|{'-' * 10}|")
    rows.append(("peak RSS: load + encode_image(8) + encode_text(101) (MiB)",
                 memory["reference"]["peak_mib"], memory["ours"]["peak_mib"]))
    rows.append(("RSS after imports, before loading (MiB)",
                 memory["reference"]["base_mib"], memory["ours"]["base_mib"]))
    for name, ref, ours in rows:
        print(f"| {name:<58} | {ref:>10.3f} | {ours:>10.3f} | {ours / ref:>8.2f} |")
    print("ours/ref: below 1 is better for seconds and MiB, above 1 is better for prompts/s")

if __name__ == "__main__":
    main()
