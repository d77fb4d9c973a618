"""Training CILF-CIAE: one plain loop, the demo by default, real datasets with a CLIP checkpoint, one CPU,
one GPU or many (torchrun), and runs that survive being killed.

Every part of the method (README.md#paper-to-code, claims 1-4) is trained here end to end: the CLIP towers
(claim 1, lr --clip-lr, or frozen), the sub-quadratic fusion Transformer (claim 2, --mixer/--depth/--width),
the image-text contrastive loss (claim 3, --contrastive-weight) and the error-feedback correction (claim 4,
--feedback-steps/--feedback-weight). The test MAE reported at the end is that of the checkpoint chosen on the
validation split (best.pt), next to the MAE of always predicting the training mean
(README.md#training-and-evaluation-practice).

Run:
    python train.py                                   # the demo: synthetic data, the pretrained demo CLIP
    python train.py --objective clip                  # pretrain the demo CLIP alone (the first demo does it)
    python train.py --dataset utkface --data-root /data/UTKFace --clip ViT-B-16.pt --out runs/utk
    python train.py --dataset morph2 --data-root /data/MORPH --protocol subject5fold --fold 0 \\
        --clip ViT-B-16.pt --out runs/morph_f0
    python train.py --dataset facebase --database MORPH_aligned.json --data-root /data --split-index 0 \\
        --clip ViT-B-16.pt --out runs/morph_split0       # the unified benchmark's split 0, aligned crops
    python train.py --out runs/utk --resume           # continue a stopped run (rerunning into --out does too)
    python train.py --method ce-baseline --dataset utkface --data-root /data/UTKFace --clip ViT-B-16.pt \
        --out runs/utk_ce                             # the plain baseline: linear head, cross-entropy
    torchrun --nproc_per_node=4 --standalone train.py --dataset utkface --data-root /data/UTKFace \\
        --clip ViT-B-16.pt --out runs/utk4            # DDP: NCCL on GPUs, gloo on CPUs
    python eval.py --ckpt runs/utk/best.pt            # the full metric table

Options: `python train.py --help` lists every one with its default. --batch-size is the global batch (images
per optimizer step, whatever the number of processes and --accum-steps), so results transfer across
hardware. Defaults written "demo: X / real: Y" depend on whether the data is the synthetic demo data.

Sections:
    1. options          option_parser, parse_args
    2. training         main, run, train_epoch; evaluate_mae, final_test, calibrate_on_held_out
    3. builders         the options resolved (check_option_combinations, resolve_defaults, default_workers),
                        the CLIP and the model config, the optimizer and lr_factor, the data, seeds, processes
                        (setup_distributed, GatherFromProcesses, freeze_untrained)
    4. the demo CLIP    pretrain_clip (--objective clip), demo_clip (built on first use), clip_loss
    5. the run folder   claim_run_folder (the lock), resume_checkpoint (check_saved_options), resume_state,
                        check_same_run, checkpoints, log.jsonl
"""
import os

# OpenMP threads that spin while waiting make a CPU shared with other processes many times slower; sleeping
# threads cost little when it is idle. Read once, when torch loads OpenMP: so before `import torch`; an
# explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import dataclasses
import json
import math
import random
import re
import shlex
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import fcntl   # the run-folder lock (POSIX)
except ImportError:
    fcntl = None
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import clip_loader
import data
from eval import (AMP_DTYPES, MIN_CALIBRATION_SUBJECTS, add_clip_options, amp_option_dtype, atomic_write,
                  autocast, calibrate, clip_record, configure_device, device_name, exit_on_checkpoint_error,
                  feedback_step_count, fraction, load_checkpoint, load_clip, move_to, non_negative_float,
                  non_negative_int, one_line_warnings, positive_float, positive_int, predict, predict_dataset,
                  probability_below_one, prompt_age_order, prompt_template, saved_option_problem, select_device,
                  uncertainty_in_years, write_json)
from model import (FEEDBACK_DESIGNS, MIN_LABEL_SIGMA, MODELS, TEXT_EMBEDDINGS, CILFConfig, LinearBaselineConfig,
                   check_prompts_fit, config_problem, weight_decayed)


# ----------------------------------------------------------------------------- 1. options

# Peak learning rate of the pretrained demo CLIP's image tower when the demo fine-tunes it.
DEMO_CLIP_LR = 1e-4
# CILFConfig fields the demo sets differently (a fusion width matching the tiny CLIP); real runs keep
# CILFConfig's defaults unless an option says otherwise.
DEMO_MODEL = dict(width=64, heads=4)
# Options that only say how a run is executed, not what it computes: they may change on resume. nan_at_step
# is in the config.json of runs started by earlier versions of train.py, where it was a testing aid.
RUNTIME_OPTIONS = {"out", "resume", "device", "amp", "workers", "compile", "grad_checkpoint", "check_images",
                   "world_size", "allow_data_change", "nan_at_step"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: X)' except where the help text already explains a mode-dependent default."""

    def _get_help_string(self, action):
        if action.default is None and ("demo:" in (action.help or "") or "default:" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def option_parser():
    """train.py's options (parse_args reads them; a continued run's saved options are checked against them)."""
    m = CILFConfig()   # the model's defaults, shown in --help
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--objective", default="age", choices=["age", "clip"], help="age: train CILF-CIAE; clip: "
                   "pretrain the demo CLIP with CLIP's own objective on captioned drawings (see --corpus-size)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=sorted(data.DATASETS),
                   help="; ".join(f"{k}: {v}" for k, v in sorted(data.DATASETS.items())).replace("%", "%%"))
    g.add_argument("--data-root", default=None, help="dataset folder or file (not needed for synthetic)")
    g.add_argument("--protocol", default=None, help="split protocol where a dataset has several (morph2: "
                   "subject5fold|random); default: the dataset's own")
    g.add_argument("--fold", "--split-index", type=non_negative_int, default=0, help="test fold of fold protocols "
                   "(fgnet, morph2); facebase: the benchmark's split 0..4 (FG-NET: the held-out folder 1..82)")
    g.add_argument("--database", nargs="+", default=None, metavar="FILE.json", help="facebase: the benchmark's "
                   "database file to train on (--data-root: the folder its img_paths are relative to)")
    g.add_argument("--crop-margin", type=non_negative_float, default=None, help="facebase: margin of the aligned "
                   f"face crop, a fraction of the box on each side; default: {data.ALIGN_MARGIN} (the benchmark's)")
    g.add_argument("--age-target", default=None, choices=["apparent", "real"], help="appa-real: which age to "
                   "learn; default: apparent")
    g.add_argument("--synthetic-n", type=positive_int, nargs=3, default=[2000, 600, 300], metavar=("TRAIN", "VAL", "TEST"),
                   help="synthetic dataset: images per split (VAL is halved into val and calibration)")
    g.add_argument("--augment", default=None, choices=["on", "off"], help="on: random resized crop, flip and "
                   "colour jitter (data.train_transform); off: the evaluation transform; demo: off / real: on")
    g.add_argument("--check-images", action="store_true", help="decode every image once before training and "
                   "stop with the list of unreadable files")
    g.add_argument("--workers", type=non_negative_int, default=None, help="data-loading processes per training "
                   "process, kept alive for the whole run; results do not depend on it; default: min(8, usable CPU "
                   "cores / training processes on this machine), at least 1")
    g.add_argument("--corpus-size", type=positive_int, default=30000, help="--objective clip: captioned drawings in "
                   "the pretraining corpus")
    g.add_argument("--caption-age-rate", type=fraction, default=0.25, help="--objective clip: share of the captions "
                   "that state the age (the others say 'a photo of a person', as most web captions leave the age "
                   "out; 1 makes the demo CLIP's zero-shot unrealistically strong, see the README's demo CLIP)")
    g = p.add_argument_group("model (CILFConfig)")
    g.add_argument("--method", default="cilf-ciae", choices=sorted(MODELS), help="cilf-ciae: the method "
                   "(model.CILFCIAE); ce-baseline: the plain baseline on the same CLIP (model.LinearAgeBaseline: "
                   "a linear head on the image embedding, cross-entropy over the age classes), which reads only "
                   "--clip*, --min-age, --max-age, --image-tower and --clip-bn of the model options")
    g.add_argument("--clip", default=None, help="CLIP checkpoint: OpenAI's RN50.pt ... ViT-L-14-336px.pt, an "
                   "open_clip file (its open_clip_config.json beside it), a Hugging Face CLIP folder; none: the "
                   "demo CLIP, pretrained on captioned drawings and cached (built on first use, see --objective "
                   "clip); random: the demo CLIP's architecture with random weights")
    add_clip_options(g)
    g.add_argument("--mixer", default=m.mixer, choices=["linear", "fourier", "softmax", "none"],
                   help="token mixer of the fusion Transformer (claim 2); none: global token only")
    g.add_argument("--depth", type=non_negative_int, default=m.depth, help="fusion blocks (0: no fusion)")
    g.add_argument("--width", type=positive_int, default=None, help=f"fusion width; demo: {DEMO_MODEL['width']} / "
                   f"real: {m.width}")
    g.add_argument("--heads", type=positive_int, default=None, help=f"attention heads; demo: {DEMO_MODEL['heads']} / "
                   f"real: {m.heads}")
    g.add_argument("--mlp-ratio", type=positive_float, default=m.mlp_ratio, help="fusion MLP hidden size / width")
    g.add_argument("--dropout", type=probability_below_one, default=m.dropout, help="dropout on the fusion's residual branches")
    g.add_argument("--no-cross-attention", action="store_true", help="image tokens do not attend to the "
                   "age-text embeddings")
    g.add_argument("--text-embeddings", default=m.text_embeddings, choices=TEXT_EMBEDDINGS, help="the age-text "
                   "embeddings T: clip (the prompts through the text tower) or random (fixed random unit vectors "
                   "of the same shape, everywhere T is read: the control for whether the language matters)")
    g.add_argument("--feedback-steps", type=feedback_step_count, default=m.feedback_steps, help="error-feedback "
                   "corrections (claim 4; 0: off)")
    g.add_argument("--feedback-hidden", type=positive_int, default=m.feedback_hidden, help="width of the error head")
    g.add_argument("--feedback-design", default=m.feedback_design, choices=FEEDBACK_DESIGNS,
                   help="reread: each step re-reads the fused image tokens at its hypothesis, trained on "
                   "perturbed hypotheses; anchored: reread that also reads a frozen copy of the pretrained image "
                   "tower (its embedding and zero-shot age; one more image-tower forward); residual: the first "
                   "reading (a head on [f, t_hat]), which cannot correct")
    g.add_argument("--feedback-text", default="on" if m.feedback_text else "off", choices=["on", "off"],
                   help="reread/anchored: the feedback's query reads the age text t_hat (off: only f and the "
                   "encoding of the hypothesis)")
    g.add_argument("--feedback-noise", type=non_negative_float, default=m.feedback_noise, help="reread: std "
                   "(years) of the perturbation of each hypothesis in training")
    g.add_argument("--uncertainty-loss", default=m.uncertainty_loss, choices=["laplace", "l1"],
                   help="how the predicted error is trained: Laplace negative log-likelihood or L1")
    g.add_argument("--sigma-y", type=positive_float, default=m.sigma_y, help="std (years) of the label distribution")
    g.add_argument("--label-sigma", default=None, choices=["fixed", "age-std"], help="the label distribution's "
                   "std per image: fixed: --sigma-y; age-std: the spread of the image's apparent-age votes (appa-real, "
                   f"a CSV's age_std column), at least {MIN_LABEL_SIGMA:g} year, --sigma-y for an image without one; "
                   "default: age-std when every training image has one, else fixed")
    g.add_argument("--distribution-weight", type=non_negative_float, default=m.distribution_weight,
                   help="weight of KL(label distribution || p)")
    g.add_argument("--l1-weight", type=non_negative_float, default=m.l1_weight, help="weight of |y0 - y|, the "
                   "base estimate's own L1")
    g.add_argument("--contrastive-weight", type=non_negative_float, default=m.contrastive_weight,
                   help="weight of the image-text contrastive loss (claim 3; 0: off)")
    g.add_argument("--contrastive-sigma", type=positive_float, default=m.contrastive_sigma,
                   help="std (years) of the soft contrastive targets")
    g.add_argument("--feedback-weight", type=non_negative_float, default=m.feedback_weight, help="weight of the corrected "
                   "ages' |y_r - y|")
    g.add_argument("--uncertainty-weight", type=non_negative_float, default=m.uncertainty_weight, help="weight of the "
                   "predicted-error loss")
    g.add_argument("--min-age", type=non_negative_float, default=m.min_age, help="first age class")
    g.add_argument("--max-age", type=non_negative_float, default=None, help="last age class; default: the oldest "
                   f"training age rounded up onto the class grid, at least {m.max_age:g}")
    g.add_argument("--prompt-template", type=prompt_template, default=m.prompt_template,
                   help="one prompt per age class")
    g.add_argument("--image-tower", default="train", choices=["train", "freeze"], help="CLIP's image tower "
                   "(trained at --clip-lr, or frozen)")
    g.add_argument("--text-tower", default=None, choices=["train", "freeze"], help="CLIP's text tower; --clip "
                   "random: train (a random tower's age prompts carry no order until trained) / otherwise: freeze "
                   "(prompt embeddings computed once and cached)")
    g.add_argument("--clip-bn", default=m.clip_bn, choices=["frozen", "train"], help="BatchNorm statistics of a "
                   "trained ResNet image tower: frozen (pretrained, eval mode; affine weights still train) or "
                   "train (moving, synchronised across processes under torchrun on GPUs)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=None, help="epochs; demo: 20 / real: 30 / "
                   f"--objective clip: {PRETRAIN['epochs']}")
    g.add_argument("--batch-size", type=positive_int, default=None, help="global batch: images per optimizer step, "
                   f"summed over processes and accumulation steps; 64 / --objective clip: {PRETRAIN['batch_size']}")
    g.add_argument("--accum-steps", type=positive_int, default=1, help="gradient accumulation: micro-batches per step")
    g.add_argument("--lr", type=positive_float, default=None, help="peak AdamW learning rate of the new modules; "
                   f"demo: 1e-3 / real: 1e-4 / --objective clip: {PRETRAIN['lr']}")
    g.add_argument("--clip-lr", type=non_negative_float, default=None, help="peak learning rate of the CLIP towers; "
                   f"demo: {DEMO_CLIP_LR} (--clip random: the --lr, a random CLIP must learn everything) / real: "
                   "1e-6 (keep the pretrained features)")
    g.add_argument("--weight-decay", type=non_negative_float, default=None, help="AdamW weight decay (not on norms, "
                   f"biases, embeddings); 0.05 / --objective clip: {PRETRAIN['weight_decay']}")
    g.add_argument("--warmup", type=non_negative_float, default=1.0, help="linear warm-up length in epochs (then cosine)")
    g.add_argument("--min-lr-ratio", type=fraction, default=0.01, help="final learning rate / peak")
    g.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of weights, splits, data order, augmentation, dropout")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder; demo: runs/demo / real: runs/<dataset> / "
                   "--objective clip: the demo CLIP's cache folder")
    g.add_argument("--resume", action="store_true", help="insist on continuing the run in --out (rerunning "
                   "into a folder that holds last.pt continues it anyway)")
    g.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N (torchrun: one GPU "
                   "per process)")
    g.add_argument("--amp", default="auto", choices=["auto", *AMP_DTYPES], help="autocast dtype; auto: bf16 on "
                   "GPUs that have it, fp16 (with a GradScaler) on older ones, off on the CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute the activations of the CLIP towers' "
                   "residual blocks in backward instead of keeping them: the same gradients for much less memory "
                   "(bench/README.md#memory) and one more forward pass of the towers")
    g.add_argument("--allow-data-change", action="store_true", help="continue a run although its dataset "
                   "changed (its fingerprint differs); the change is recorded in config.json and the checkpoints")
    return p


def parse_args(argv=None):
    p = option_parser()
    args = resolve_defaults(p.parse_args(argv))
    problem = None if args.objective == "clip" else check_option_combinations(args)
    if problem:
        p.error(problem)
    return args


# ----------------------------------------------------------------------------- 2. training: main, run, train_epoch

def main(argv=None):
    """Train (or, with --objective clip, pretrain the demo CLIP) as the command line argv says; returns the
    final test result (the pretraining's record)."""
    one_line_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.objective == "clip":
        return pretrain_clip(args)
    rank, world, device = setup_distributed(args.device)
    lock = claim_run_folder(Path(args.out)) if rank == 0 else None
    try:
        return run(args, rank, world, device, argv)
    finally:
        if lock is not None:
            lock.close()   # releases the run folder
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device, argv_of_run=()):
    """One run into args.out (this process's part of it under torchrun): build the model and the data,
    continue from last.pt if the folder holds one, train with a checkpoint after every epoch, then test
    best.pt. argv_of_run: the command line, for the advice after a non-finite loss."""
    if args.batch_size % (world * args.accum_steps):
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by processes x --accum-steps "
                         f"({world} x {args.accum_steps})")
    out = Path(args.out)
    ckpt = resume_checkpoint(args, out)   # None for a new run; read and checked before anything is built
    configure_device(device)   # TF32 and cuDNN autotuning on a GPU, as eval.py does
    amp_dtype = amp_option_dtype(args.amp, device)

    if args.clip == str(DEMO_CLIP_FILE):
        demo_clip()   # built here, if need be, before the run's seeding: a first run equals a later one
    seed_all(args.seed)
    clip_model = build_clip(args)
    clip_model.set_grad_checkpointing(args.grad_checkpoint)
    splits, options = build_splits(args, clip_model.visual.input_resolution,
                                   (clip_model.image_mean, clip_model.image_std))
    if args.check_images:
        refuse_unreadable_images(splits)
    resolve_max_age(args, [s.age for s in splits["train"].samples])
    resolve_label_sigma(args, splits["train"].samples, rank)
    config = build_config(args)
    # the loader then gives each training image's age_std, and train_epoch hands it to the loss
    splits["train"].with_age_std = isinstance(config, CILFConfig) and config.label_sigma == "age-std"
    refuse_ages_outside_classes(splits["train"], config)
    if isinstance(config, CILFConfig):   # the ce-baseline reads no prompts
        try:
            check_prompts_fit(config, clip_model.context_length)
        except ValueError as e:
            raise SystemExit(f"--prompt-template with --clip {args.clip}: {e}") from None
    raw_model = MODELS[args.method][0](clip_model, config)
    train_set = EpochSeeded(splits["train"], args.seed)
    data_index = [entry for split, dataset in splits.items() for entry in data.index_entries(dataset, split)]
    run_config = build_run_config(args, world, options, config, clip_model, splits, data_index)
    raw_model = sync_batchnorm(raw_model.to(device), args, device, world)

    loader = build_train_loader(train_set, args, world, device)
    steps_per_epoch = math.ceil(len(loader) / args.accum_steps)
    if steps_per_epoch == 0:
        raise SystemExit(f"the training split ({len(train_set)} images) is smaller than one micro-batch of all "
                         f"{world} processes ({args.batch_size // args.accum_steps} images); lower --batch-size")
    total_steps, warmup_steps = steps_per_epoch * args.epochs, round(args.warmup * steps_per_epoch)
    schedule = lambda step: lr_factor(step, total_steps, warmup_steps, args.min_lr_ratio)
    optimizer = build_optimizer(raw_model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = resume_state(ckpt, out, run_config, data_index, args, rank, raw_model, optimizer, scaler)
    model = raw_model
    if dist.is_initialized():   # under torchrun, one process included: the same code path as on many
        frozen = freeze_untrained(raw_model, device)
        if frozen and rank == 0:
            print(f"{len(frozen)} parameter tensor(s) no loss term reaches under these options are frozen "
                  f"for DDP (e.g. {frozen[0]})")
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:   # after DDP, as torch recommends: DDP's buckets then split the compiled graph
        model = torch.compile(model)

    if rank == 0:
        write_json(out / "config.json", run_config)
    log = open_log(out, state["log_offset"], rank)
    if rank == 0:
        where = f"resumed after epoch {state['epoch']}" if ckpt else "new run"
        print(f"{where}: {args.dataset} ({len(splits['train'])} train / {len(splits['val'])} val / "
              f"{len(splits['calibration'])} calibration / {len(splits['test'])} test), {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M "
              f"parameters, {world} process(es) on {device}, {args.epochs} epochs of {steps_per_epoch} steps "
              f"-> {out}")

    while state["epoch"] < args.epochs:
        epoch_start = time.time()
        # every source of randomness restarts from (seed, epoch): the order (same on every process, each
        # taking its slice of every global batch), each image's augmentation (EpochSeeded) and, per
        # process, dropout
        seed_all(mix_seed(args.seed, state["epoch"], rank))
        data.set_epoch(loader, state["epoch"])
        train_set.epoch.fill_(state["epoch"])
        try:
            train_loss, train_mae = train_epoch(model, raw_model, loader, optimizer, scaler, schedule, state, args,
                                                device, amp_dtype, world, log)
            train_seconds = time.time() - epoch_start
        except NonFiniteLoss as e:
            kept = f"{out / 'last.pt'} (after epoch {state['epoch']})" if state["epoch"] else "none yet"
            raise SystemExit(f"{e}\nstopped. Last good checkpoint: {kept}. A run continues only with its own "
                             f"options; to try a lower learning rate start a new run:\n  "
                             f"{lower_lr_command(args, argv_of_run)}") from None
        val_mae = evaluate_mae(raw_model, splits["val"], args, device, amp_dtype, rank, world)
        state["epoch"] += 1
        improved = val_mae < state["best_val_mae"]
        if improved:
            state["best_val_mae"] = val_mae
        seconds = time.time() - epoch_start
        record = {"type": "epoch", "epoch": state["epoch"], "step": state["step"], "train_loss": train_loss,
                  "train_mae": train_mae, "val_mae": val_mae, "best_val_mae": state["best_val_mae"],
                  "seconds": seconds,
                  "train_images_per_s": len(loader) * args.batch_size // args.accum_steps / train_seconds}
        state["history"].append(record)
        log(record)
        if rank == 0:
            print(f"epoch {state['epoch']:3d}/{args.epochs}  loss {train_loss:.4f}  train MAE {train_mae:.3f}  "
                  f"val MAE {val_mae:.3f}{'  *best' if improved else ''}  ({seconds:.1f}s)")
            state["log_offset"] = log.offset()
            ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),   # {} unless fp16
                    "scheduler": {"step": state["step"], "total_steps": total_steps, "warmup_steps": warmup_steps},
                    "step": state["step"], "epoch": state["epoch"], "config": run_config,
                    "best_val_mae": state["best_val_mae"], "history": state["history"],
                    "log_offset": state["log_offset"], "data_index": data_index}
            save_epoch_checkpoints(out, ckpt, improved)
        if dist.is_initialized():
            dist.barrier()   # nobody starts the next epoch (or the test) before the checkpoint exists

    del loader   # ends its workers
    return final_test(raw_model, splits, args, out, device, amp_dtype, rank, world, log)


class NonFiniteLoss(RuntimeError):
    """A step whose loss (or a part of it) is NaN or infinite: run() stops there, keeping last.pt."""


def train_epoch(model, raw_model, loader, optimizer, scaler, schedule, state, args, device, amp_dtype, world, log):
    """One epoch of optimizer steps. state holds 'step' (global optimizer step), updated in place. scaler: a
    torch.amp.GradScaler, enabled on the fp16 path only (small gradients would underflow to zero in fp16;
    a step whose scaled gradients overflow is skipped and the scale lowered). Returns (mean loss, mean
    absolute error) over the epoch, averaged over processes.

    The loss parts and the errors are summed on the device and read once per optimizer step, when the step
    is logged: the one host sync of a step (a GPU runs ahead of Python between them). A non-finite loss is
    caught there, after the step it happened in, which it names; the run then stops without saving. With
    --label-sigma age-std the loader's batches carry each image's age_std as a third item, for the loss."""
    model.train()
    n_batches = len(loader)
    distributed = dist.is_initialized()
    gather = GatherFromProcesses.apply if world > 1 else None   # the contrastive loss over the global batch
    group_values = 0.0   # loss and its parts summed over the micro-batches of the current step (device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)   # loss * n, |error| sum (this process)
    count = 0            # images (this process)
    bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}/{args.epochs}", leave=False,
               disable=state["rank"] != 0 or not sys.stderr.isatty())
    for i, (images, ages, *age_std) in enumerate(bar):   # age_std: with --label-sigma age-std
        group_start = i - i % args.accum_steps
        group_size = min(args.accum_steps, n_batches - group_start)   # last group of an epoch may be short
        last_in_group = i == group_start + group_size - 1
        images, ages = move_to(images, device), move_to(ages.float(), device)
        age_std = move_to(age_std[0], device) if age_std else None
        # DDP all-reduces gradients on every backward unless told not to: only on a group's last micro-batch
        sync = model.no_sync() if (distributed and not last_in_group) else contextlib.nullcontext()
        with sync:
            with autocast(device, amp_dtype):
                out = model(images)
                loss, parts = raw_model.loss(out, ages, gather, age_std)
            scaler.scale(loss / group_size).backward()
        names = sorted(parts)
        values = torch.stack([loss.detach()] + [parts[k].detach() for k in names]).double()
        group_values = group_values + values
        err = (out.age.detach().float() - ages).abs()
        totals += torch.stack([values[0] * len(ages), err.sum().double()])
        count += len(ages)
        if not last_in_group:
            continue
        factor = schedule(state["step"])
        set_learning_rates(optimizer, factor)
        scaler.unscale_(optimizer)   # true gradients for the clipping (a no-op unless fp16)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        raw_model.clamp_logit_scale()   # the temperature's cap, after the step (not a clamp in forward)
        optimizer.zero_grad(set_to_none=True)
        values = group_values / group_size
        if world > 1:
            dist.all_reduce(values)
        values, group_values = (values / world).tolist(), 0.0   # the one host sync of the step
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLoss(f"non-finite loss at step {state['step']} (epoch {state['epoch'] + 1}, batches "
                                f"{group_start}-{i}): loss={values[0]} "
                                + " ".join(f"{k}={v}" for k, v in zip(names, values[1:])))
        bar.set_postfix(loss=f"{values[0]:.3f}")
        log({"type": "step", "epoch": state["epoch"] + 1, "step": state["step"], "lr_factor": factor,
             "loss": values[0], **dict(zip(names, values[1:])),
             **({"grad_scale": scaler.get_scale()} if scaler.is_enabled() else {})})
        state["step"] += 1
    loss_sum, err_sum = totals.tolist()
    loss_sum, err_sum, n = all_reduce_sum([loss_sum, err_sum, count], device, world)
    return loss_sum / n, err_sum / n


@torch.no_grad()
def evaluate_mae(model, dataset, args, device, amp_dtype, rank, world):
    """Exact MAE of model on dataset under DDP: each process takes every world-th image (no padding, no
    duplicates, unlike DistributedSampler), then the sums of |error| and the counts are all-reduced.
    Unreadable images are left out and counted, as eval.py does (the dataset is built drop_unreadable),
    so both report the same MAE for the same checkpoint."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=max(1, args.batch_size // world), shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=data.collate_readable)
    result = predict(model, loader, device, amp_dtype)
    abs_sum, count = all_reduce_sum([float(np.abs(result["age"] - result["target"]).sum()), len(result["age"])],
                                    device, world)
    if count < len(dataset) and rank == 0:
        print(f"warning: {len(dataset) - int(count)} of {len(dataset)} image(s) unreadable, left out of this MAE",
              file=sys.stderr)
    if count == 0:
        raise SystemExit(f"none of the {len(dataset)} evaluation images could be read; run with --check-images")
    return abs_sum / count


def final_test(raw_model, splits, args, out, device, amp_dtype, rank, world, log):
    """Test MAE of best.pt (chosen on validation) next to the MAE of always predicting the training mean;
    then best.pt is calibrated for conformal age intervals on validation (rewritten atomically)."""
    best = exit_on_checkpoint_error(load_checkpoint, out / "best.pt")
    raw_model.load_state_dict(best["model"])
    test_mae = evaluate_mae(raw_model, splits["test"], args, device, amp_dtype, rank, world)
    train_mean = float(np.mean([s.age for s in splits["train"].samples]))
    baseline = float(np.mean([abs(s.age - train_mean) for s in splits["test"].samples]))
    result = {"type": "test", "best_epoch": best["epoch"], "val_mae": best["best_val_mae"], "test_mae": test_mae,
              "train_mean": train_mean, "baseline_mae": baseline}
    if rank == 0:
        print(f"test MAE {test_mae:.3f} (best.pt: epoch {best['epoch']}, val MAE {best['best_val_mae']:.3f}); "
              f"always predicting the training mean {train_mean:.2f}: test MAE {baseline:.3f}")
        if len(splits["calibration"]):
            best["calibration"] = calibrate_on_held_out(raw_model, splits["calibration"], args, device)
            save_checkpoint(out / "best.pt", best)
        else:
            print("warning: the calibration part of the validation split is empty (one validation subject): no "
                  "uncertainty scale and no age intervals in best.pt", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()   # best.pt is complete before any process returns
    log(result)
    return result


def calibrate_on_held_out(model, calibration_set, args, device):
    """Calibration of the model (best.pt's weights) on the calibration part of the validation split, which
    chose nothing: u's scale in years and the quantiles behind eval.py's age intervals (eval.calibrate),
    printed in years for a typical image. Warns when it holds fewer than MIN_CALIBRATION_SUBJECTS subjects."""
    result, samples = predict_dataset(model, calibration_set, args, device)
    calibration = calibrate(result["age"], result["target"], result["uncertainty"], f"{args.dataset} calibration")
    subjects = len({data.subject_key(s) for s in samples})
    if subjects < MIN_CALIBRATION_SUBJECTS:
        print(f"warning: the calibration part holds {subjects} subject(s) (fewer than {MIN_CALIBRATION_SUBJECTS}): "
              f"the intervals' coverage holds on average over such draws of subjects, and one run's may be far "
              f"from its level (README.md#age-intervals)", file=sys.stderr)
    typical = float(np.median(uncertainty_in_years(np.maximum(result["uncertainty"], 0.0), calibration))) \
        + calibration["delta"]
    print(f"u calibrated on {calibration['n']} held-out images (x {calibration['uncertainty_scale']:.3f} to years); "
          f"conformal intervals stored in best.pt: "
          + ", ".join(f"{100 * float(level):g}% +-{q['normalised'] * typical:.1f} y at the median uncertainty "
                      f"(plain +-{q['plain']:.1f} y)" for level, q in calibration["quantiles"].items()))
    return calibration


# ----------------------------------------------------------------------------- 3. builders

# options resolved: what parse_args checks and fills in after parsing

def default_workers():
    """Data-loading processes per training process: the CPU cores this process may use (its affinity mask, as
    a container or taskset sets it) shared by the training processes torchrun starts on this machine, at
    least 1 (decoding then overlaps the training step), at most 8 (each holds its own copy of the dataset and
    its prefetched batches); whether they keep up with a model: bench/README.md#data-loading."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def check_option_combinations(args):
    """The first inconsistency between options as a message, or None. The model config's rules are
    model.config_problem's (eval.py applies them to a checkpoint too); --max-age left out is resolved from the
    training split later, at most data.AGE_RANGE's end."""
    ages = dict(max_age=data.AGE_RANGE[1]) if args.max_age is None else {}
    problem = config_problem(dataclasses.replace(build_config(args), **ages), data.AGE_RANGE[1])
    if problem:
        return f"--{problem[0].replace('_', '-')}: {problem[1]}"
    if args.dataset != "synthetic" and args.data_root is None:
        return f"--dataset {args.dataset} needs --data-root"
    if args.method == "ce-baseline" and args.text_tower == "train":
        return "--method ce-baseline never reads the text tower: --text-tower train would not train it"
    if args.method == "ce-baseline" and args.label_sigma == "age-std":
        return "--method ce-baseline trains on plain cross-entropy targets: --label-sigma age-std would not change them"
    if args.text_embeddings == "random" and args.text_tower == "train":
        return "--text-embeddings random never reads the text tower: --text-tower train would not train it"
    if args.feedback_text == "off" and args.feedback_design == "residual":
        return "--feedback-text off is for --feedback-design reread or anchored (residual reads f and t_hat only)"
    if (args.dataset == "facebase") != (args.database is not None):
        return "--dataset facebase needs --database FILE.json" if args.database is None else \
            f"--database is for --dataset facebase, not {args.dataset}"
    if args.crop_margin is not None and args.dataset != "facebase":
        return f"--crop-margin is for --dataset facebase, not {args.dataset}"
    if args.database is not None and len(args.database) > 1:
        return "--database: a run trains on one database; test on several with eval.py --split all"
    return None


def resolve_defaults(args):
    """Fill the mode-dependent defaults. The demo (synthetic data) trains a tiny model fast; a pretrained
    CLIP should move little (small --clip-lr, README.md#training-and-evaluation-practice), the tiny demo
    CLIP a bit more; a random CLIP must learn everything; the pretraining of the demo CLIP has its own
    settings (PRETRAIN)."""
    m = CILFConfig()
    args.workers = default_workers() if args.workers is None else args.workers
    if args.objective == "clip":
        for name, value in PRETRAIN.items():
            setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
        args.out = os.path.abspath(os.path.expanduser(args.out or str(DEMO_CLIP_FILE.parent)))
        return args
    demo, random_clip = args.dataset == "synthetic", args.clip == "random"
    pick = lambda value, if_demo, if_real: value if value is not None else (if_demo if demo else if_real)
    args.epochs = pick(args.epochs, 20, 30)
    # The drawings vary in position, size, tilt, colours and noise already, and their proportions carry age
    # (a child's rounder head): the crop's aspect jitter would blur that cue (README, Training).
    args.augment = pick(args.augment, "off", "on")
    args.batch_size = pick(args.batch_size, 64, 64)
    args.lr = pick(args.lr, 1e-3, 1e-4)
    args.clip_lr = pick(args.clip_lr, args.lr if random_clip else DEMO_CLIP_LR, 1e-6)
    args.text_tower = args.text_tower or ("train" if random_clip and args.method == "cilf-ciae" else "freeze")
    args.width = pick(args.width, DEMO_MODEL["width"], m.width)
    args.heads = pick(args.heads, DEMO_MODEL["heads"], m.heads)
    args.weight_decay = pick(args.weight_decay, 0.05, 0.05)
    args.out = pick(args.out, "runs/demo", f"runs/{args.dataset}")
    # absolute from here on: config.json and the checkpoints must name the same files from any folder
    absolute = lambda path: path if path is None else os.path.abspath(os.path.expanduser(path))
    args.data_root, args.out = absolute(args.data_root), absolute(args.out)
    if args.database is not None:
        args.database = [absolute(path) for path in args.database]
    if args.dataset == "facebase" and args.crop_margin is None:
        args.crop_margin = data.ALIGN_MARGIN
    args.clip = str(DEMO_CLIP_FILE) if args.clip is None else args.clip if args.clip == "random" else absolute(args.clip)
    if args.clip == str(DEMO_CLIP_FILE):   # OpenAI's architecture, said as an OpenAI file's name says it
        args.clip_activation = args.clip_activation or "quick_gelu"
        args.clip_vision_head_width = args.clip_vision_head_width or 64
        args.clip_text_head_width = args.clip_text_head_width or 64
    return args


# the model

def build_clip(args):
    """The CLIP of --clip: a checkpoint file (by default the demo CLIP, see demo_clip) or the demo's
    architecture with random weights ("random", seeded by the caller)."""
    if args.clip == "random":
        clip_model = clip_loader.CLIP(**DEMO_CLIP)
        # Every released CLIP ends pretraining with its temperature at the cap, 100; a random one starts at
        # 1/0.07, a softmax over the 101 age prompts too flat for the demo's few hundred steps to sharpen
        # (its predictions then shrink towards the mean age). CILFCIAE starts its own temperature here.
        with torch.no_grad():
            clip_model.logit_scale.fill_(math.log(100.0))
        return clip_model
    return load_clip(args)


def build_config(args):
    """The model config of --method from the options (CILFConfig: every field has one; LinearBaselineConfig:
    the age classes and the image tower). run() resolves --max-age and --label-sigma from the training
    split first (resolve_max_age, resolve_label_sigma); left unresolved (no data at hand, as in bench/train.py),
    they are CILFConfig's."""
    max_age = CILFConfig.max_age if args.max_age is None else args.max_age
    if args.method == "ce-baseline":
        return LinearBaselineConfig(min_age=args.min_age, max_age=max_age,
                                    freeze_image_tower=args.image_tower == "freeze", clip_bn=args.clip_bn)
    return CILFConfig(min_age=args.min_age, max_age=max_age, prompt_template=args.prompt_template,
                      mixer=args.mixer, depth=args.depth, width=args.width, heads=args.heads,
                      mlp_ratio=args.mlp_ratio, dropout=args.dropout, cross_attention=not args.no_cross_attention,
                      text_embeddings=args.text_embeddings,
                      feedback_steps=args.feedback_steps, feedback_hidden=args.feedback_hidden,
                      feedback_design=args.feedback_design, feedback_text=args.feedback_text == "on",
                      feedback_noise=args.feedback_noise,
                      uncertainty_loss=args.uncertainty_loss,
                      freeze_image_tower=args.image_tower == "freeze", freeze_text_tower=args.text_tower == "freeze",
                      clip_bn=args.clip_bn,
                      sigma_y=args.sigma_y, label_sigma=args.label_sigma or CILFConfig.label_sigma,
                      distribution_weight=args.distribution_weight, l1_weight=args.l1_weight,
                      contrastive_weight=args.contrastive_weight, contrastive_sigma=args.contrastive_sigma,
                      feedback_weight=args.feedback_weight, uncertainty_weight=args.uncertainty_weight)


def resolve_max_age(args, train_ages):
    """Fill --max-age from the training split (age_classes_max); refuse one below the oldest training age."""
    oldest = max(train_ages)
    if args.max_age is None:
        args.max_age = float(age_classes_max(train_ages, args.min_age))
    elif args.max_age < oldest:
        raise SystemExit(f"--max-age {args.max_age:g} is below the oldest training age, {oldest:g}: the model could "
                         f"not predict it (leave --max-age out to cover the training split)")


def resolve_label_sigma(args, train_samples, rank):
    """Fill --label-sigma from the training split (cilf-ciae; the ce-baseline has no label distribution):
    age-std when every training image has an apparent-age std, else fixed. Refuse age-std where none has one;
    say how many keep --sigma-y where only some have one."""
    if args.method == "ce-baseline":
        return
    n, with_std = len(train_samples), sum(s.age_std is not None for s in train_samples)
    if args.label_sigma is None:
        args.label_sigma = "age-std" if with_std == n else "fixed"
    elif args.label_sigma == "age-std" and with_std == 0:
        raise SystemExit(f"--label-sigma age-std: no training image of --dataset {args.dataset} has an apparent-age "
                         f"std (appa-real's apparent_age_std, a CSV's age_std column); use --label-sigma fixed")
    if args.label_sigma == "age-std" and with_std < n and rank == 0:
        print(f"--label-sigma age-std: {n - with_std} of {n} training images have no age_std; their label "
              f"distribution keeps --sigma-y {args.sigma_y:g}")


def age_classes_max(train_ages, min_age, age_step=CILFConfig.age_step, at_least=CILFConfig.max_age):
    """The last age class: the oldest training age rounded up onto the grid min_age + k * age_step, and at
    least `at_least` (100), so the classes, the feedback's inverse map and the predictions cover every
    training age (UTKFace goes to 116)."""
    top = max(max(train_ages), at_least)
    return min_age + math.ceil((top - min_age) / age_step - 1e-9) * age_step


def refuse_ages_outside_classes(train_set, config):
    """Every training age must lie among the age classes (--min-age..--max-age): the distribution over
    the classes cannot represent others, and their losses would be silently wrong."""
    outside = [s for s in train_set.samples if not config.min_age <= s.age <= config.max_age]
    if outside:
        raise SystemExit(f"{len(outside)} training label(s) lie outside the age classes {config.min_age:g}..."
                         f"{config.max_age:g} (e.g. {outside[0].source or outside[0].path}: age {outside[0].age:g}); "
                         f"widen --min-age/--max-age")


def sync_batchnorm(raw_model, args, device, world):
    """Under DDP with --clip-bn train, BatchNorm statistics computed over all processes' images
    (SyncBatchNorm; weights and buffers keep their names), not one set per process."""
    if world == 1 or args.clip_bn != "train" or args.image_tower == "freeze" or not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in raw_model.modules()):
        return raw_model
    if device.type != "cuda":
        raise SystemExit("--clip-bn train under torchrun needs GPUs: torch's SyncBatchNorm has no CPU kernel "
                         "(use --clip-bn frozen, the default, or one process)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)


def build_optimizer(raw_model, args, device):
    """AdamW over the model's parameter groups (CILFCIAE.param_groups: the CLIP towers at --clip-lr, the new
    modules at --lr, weight decay where model.weight_decayed says). Each group keeps its peak rate as
    base_lr, which train_epoch scales by the schedule (lr_factor) at every step."""
    groups = raw_model.param_groups(args.clip_lr, args.lr, args.weight_decay)
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")


def set_learning_rates(optimizer, factor):
    """The rates of this optimizer step, the one place the loops set them: each group's peak rate (its
    base_lr) times the schedule's factor, never the current rate times it (that would compound)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def lr_factor(step, total_steps, warmup_steps, min_ratio=0.0):
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up from
    1/warmup_steps to 1, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def dataset_build_options(args, resolution):
    """Keyword options for data.build_dataset beyond name/root/split/fold/transform/seed."""
    if args.dataset == "synthetic":
        return {"n": dict(zip(("train", "val", "test"), args.synthetic_n)),
                "image_size": data.synthetic_image_size(resolution)}
    options = {}
    if args.dataset == "facebase":
        options.update(database=args.database, margin=args.crop_margin,
                       crop_size=data.aligned_crop_size(resolution, args.crop_margin))
    if args.protocol is not None:
        options["protocol"] = args.protocol
    if args.age_target is not None:
        options["age_target"] = args.age_target
    return options


class EpochSeeded(torch.utils.data.Dataset):
    """Sample i's random augmentation in epoch e depends on (seed, e, i) alone: not on the process, the
    worker or the order it is drawn in. So a resumed run, a run with more workers and a run on more
    processes see the same augmented images. The epoch lives in shared memory so that persistent
    DataLoader workers see it change."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):   # torchvision's random transforms draw from torch's RNG
            torch.manual_seed(mix_seed(self.seed, int(self.epoch), i))
            return self.dataset[i]


def build_splits(args, resolution, normalization=(clip_loader.CLIP_MEAN, clip_loader.CLIP_STD)):
    """train (augmented, EpochSeeded), val and test datasets, and the dataset options used.
    normalization: the CLIP's (mean, std)."""
    options = dataset_build_options(args, resolution)
    splits = {}
    for split in ("train", "val", "calibration", "test"):
        augment = split == "train" and args.augment == "on"
        if args.dataset == "facebase":   # augmentation on the aligned crop, never on the photograph
            transform = data.aligned_transform(resolution, augment, *normalization)
        else:
            transform = (data.train_transform if augment else data.eval_transform)(resolution, *normalization)
        try:
            splits[split] = data.build_dataset(args.dataset, args.data_root, split=split, fold=args.fold,
                                               transform=transform, seed=args.seed,
                                               drop_unreadable=split != "train", **options)
        except (FileNotFoundError, ValueError) as e:   # data.DatasetError is a ValueError
            raise SystemExit(f"--dataset {args.dataset}: {e}") from None
    return splits, options


def build_train_loader(train_set, args, world, device):
    """The training loader of the whole run (this process's share of each global batch): its workers start
    once and serve every epoch; data.set_epoch(loader, epoch) sets each epoch's order, a permutation seeded
    with mix_seed(seed, epoch) (data.GlobalBatchSampler), so it needs no saved state and every launcher
    draws the same global batches."""
    return data.build_loader(train_set, args.batch_size // (world * args.accum_steps), train=True,
                             num_workers=args.workers, device=str(device), seed=args.seed,
                             epoch_seed=lambda epoch: mix_seed(args.seed, epoch))


def refuse_unreadable_images(splits):
    """Decode every image once, so that a bad file stops the run now, by name, not hours into training
    (during training an unreadable image is replaced by the next one, with a warning)."""
    bad = [f"{path}: {reason}" for dataset in splits.values()
           for path, reason in data.check_images(dataset, progress=sys.stderr.isatty())]
    if bad:
        raise SystemExit(f"{len(bad)} unreadable image(s):\n" + "\n".join(bad[:20])
                         + ("\n..." if len(bad) > 20 else ""))


def mix_seed(*numbers):
    """One well-mixed 63-bit seed from several non-negative integers, e.g. (run seed, epoch, process):
    randomness that depends on such tuples alone is what makes a resumed run equal an uninterrupted one."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_all(seed):
    """Seed python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup_distributed(device_name):
    """(rank, world_size, device). Under torchrun (RANK in the environment) joins the process group:
    NCCL with one GPU per process, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, select_device(device_name)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class GatherFromProcesses(torch.autograd.Function):
    """(b, ...) on each of N processes -> (N b, ...), the processes' parts in rank order, on every process:
    what the contrastive loss compares over the global batch. The gradient reaches each process's own part:
    backward sums over the processes what each process's copy of the loss sends to the whole, and keeps
    the local part's slice. Every process computes the same global contrastive loss, so its part receives
    N times the gradient of one loss, which DDP's mean over the N processes brings back to exactly one: the
    gradients equal those of one process with the whole batch."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def freeze_untrained(raw_model, device):
    """Freeze (requires_grad False) every parameter that no loss term of this run reaches, and return their
    names: e.g. the rating head with --uncertainty-weight 0, most of the feedback with --feedback-weight 0
    and --l1-weight 0 (with --feedback-weight 0 alone, y0's L1 still reaches all of the feedback, with zeros,
    through the stack of every step's estimate that y0 is read from: nothing is frozen). DDP expects a
    gradient for every parameter that requires one and stops at the second step without it; in one process
    these get none either, so they never change (AdamW skips a parameter without a gradient) and freezing
    them changes nothing else: the run builds for DDP only what it trains. Chosen
    over DDP's find_unused_parameters, which looks only at which parameters the forward pass reached
    (these are reached: their outputs are computed, then left out of the loss), and static_graph, which
    breaks with no_sync (gradient accumulation). Found by one backward pass on two blank images, in eval
    mode (no BatchNorm statistics move) with the RNG states restored, so the run draws what it would have
    drawn without it; one pass is enough since every step builds the same graph."""
    resolution = raw_model.clip.visual.input_resolution
    images = torch.zeros(2, 3, resolution, resolution, device=device)
    ages = raw_model.ages[[0, -1]]
    trainable = [(name, p) for name, p in raw_model.named_parameters() if p.requires_grad]
    training = raw_model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        raw_model.eval()
        loss, _ = raw_model.loss(raw_model(images), ages)
        grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    raw_model.train(training)
    frozen = [(name, p) for (name, p), g in zip(trainable, grads) if g is None]
    for _, p in frozen:
        p.requires_grad_(False)
    return [name for name, _ in frozen]


def all_reduce_sum(values, device, world):
    """Sum a list of floats over processes (float64, exact enough for counts and error sums)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- 4. the demo CLIP (--objective clip)

# The demo CLIP (README.md#clip-features at toy size): OpenAI's ViT architecture pretrained with CLIP's own
# objective (clip_loss: symmetric InfoNCE, learned temperature capped at 100) on data.CaptionedDrawings, where
# a quarter of the captions state the age (--caption-age-rate; the rest say "a photo of a person", as most web
# captions leave the age out), written as a state dict with OpenAI's key names to DEMO_CLIP_FILE with its
# SHA-256 and options beside it (demo_clip.json); the demo checks both and reads the file with
# clip_loader.load. Its recipes and what they give: bench/README.md#demo-clip.

# The demo's CLIP: a ViT small enough to train from scratch on a CPU in minutes, with the real
# 49408-token vocabulary so that the prompts go through the real tokenizer (16 tokens hold the longest
# prompt, "a photo of a 100 year old person.", with room to spare; 77 would only cost time). Heads are
# width // 64 in both towers, as clip_loader.build_model infers them back from a checkpoint.
DEMO_CLIP = dict(embed_dim=64, image_resolution=32, vision_layers=3, vision_width=96, vision_patch_size=8,
                 context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=2)
# Where the demo keeps its pretrained CLIP (built by `python train.py --objective clip` on first use, then
# read by clip_loader.load like any OpenAI file), and the SHA-256 record written beside it.
DEMO_CLIP_FILE = Path(__file__).resolve().parent / "runs" / "demo_clip" / "demo_clip.pt"
# The demo CLIP's pretraining (--objective clip): sized to take a few minutes on a CPU (bench/README.md#demo-clip).
PRETRAIN = dict(epochs=5, batch_size=128, lr=1e-3, clip_lr=1e-3, weight_decay=0.1)


def clip_loss(image_emb, text_emb, logit_scale):
    """CLIP's pretraining loss: symmetric InfoNCE over a batch of matching pairs (image i with caption i).

    image_emb, text_emb (B, E), any norm; logit_scale: the log of the multiplier (CLIP's learned
    temperature). Cross-entropy of each image over the B captions and of each caption over the B images,
    the pair's own index the class, averaged."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.t()  # (B, B): image i vs caption j
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def demo_clip():
    """Path of the pretrained demo CLIP: built on first use (`python train.py --objective clip`, a few
    minutes), then read from the cache, its SHA-256 checked against the record written beside it when it
    was built."""
    record = DEMO_CLIP_FILE.with_suffix(".json")
    if not DEMO_CLIP_FILE.exists() or not record.exists():
        if "RANK" in os.environ:
            raise SystemExit("the demo CLIP is not built yet; build it first with one process: "
                             "python train.py --objective clip")
        print(f"the demo CLIP is not built yet: pretraining it once (python train.py --objective clip) "
              f"-> {DEMO_CLIP_FILE}", flush=True)
        pretrain_clip(parse_args(["--objective", "clip"]))
    recorded = json.loads(record.read_text(encoding="utf-8"))
    want, got = recorded["sha256"], clip_loader.sha256(DEMO_CLIP_FILE)
    if got != want:
        raise SystemExit(f"{DEMO_CLIP_FILE}: SHA-256 {got} differs from the one recorded in {record} ({want}); "
                         f"delete both and rebuild with: python train.py --objective clip")
    # A cache built by an older version (or by hand with other options) would give other figures than the
    # README's without a word: name the difference. Older records lack caption_age_rate (it was then 1).
    built = {"caption_age_rate": 1.0, **recorded.get("options", {})}
    differ = {k: (built.get(k), v) for k, v in demo_clip_options().items() if built.get(k) != v}
    if differ:
        said = ", ".join(f"{k} {old} (default {new})" for k, (old, new) in differ.items())
        raise SystemExit(f"{DEMO_CLIP_FILE} was built with other options than the demo's: {said}; delete "
                         f"{DEMO_CLIP_FILE.parent} to rebuild it with the defaults, or move it elsewhere and pass "
                         f"its new path as --clip")
    return DEMO_CLIP_FILE


def demo_clip_options():
    """The options the demo's own CLIP is built with (`python train.py --objective clip`)."""
    return pretrain_options(parse_args(["--objective", "clip"]))


def pretrain_options(args):
    """The options of a demo CLIP pretraining that decide its weights (recorded beside the file)."""
    return {k: v for k, v in vars(args).items() if k in ("seed", "corpus_size", "caption_age_rate", "epochs",
                                                          "batch_size", "lr", "weight_decay", "warmup",
                                                          "min_lr_ratio", "grad_clip")}


def pretrain_clip(args):
    """Pretrain the demo CLIP as CLIP was pretrained (symmetric InfoNCE, learned temperature capped at
    100) on data.CaptionedDrawings, then write its state dict (OpenAI's key names, so clip_loader.load
    reads it like an OpenAI file) to args.out/demo_clip.pt, atomically, with demo_clip.json beside it:
    the SHA-256, the options and the figures of the run."""
    start = time.time()
    device = select_device(args.device)
    seed_all(args.seed)
    clip_model = clip_loader.CLIP(**DEMO_CLIP).to(device).train()
    images, tokens = render_corpus(args)   # (n, 3, R, R) uint8, (n, L)
    steps_per_epoch = len(images) // args.batch_size
    total_steps, warmup_steps = steps_per_epoch * args.epochs, round(args.warmup * steps_per_epoch)
    decay = [p for n, p in clip_model.named_parameters() if weight_decayed(n, p)]
    no_decay = [p for n, p in clip_model.named_parameters() if not weight_decayed(n, p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay, "base_lr": args.lr},
                                   {"params": no_decay, "weight_decay": 0.0, "base_lr": args.lr}], lr=args.lr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"pretraining the demo CLIP: {args.corpus_size} captioned drawings, {args.epochs} epochs of "
          f"{steps_per_epoch} steps of {args.batch_size} -> {out}", flush=True)
    step, history = 0, []
    mean = torch.tensor(clip_loader.CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(clip_loader.CLIP_STD, device=device).view(1, 3, 1, 1)
    for epoch in range(args.epochs):
        seed_all(mix_seed(args.seed, epoch))
        order = torch.randperm(len(images))
        totals = np.zeros(3)   # loss sum, image->caption top-1 hits, pairs
        for batch in order[:steps_per_epoch * args.batch_size].view(steps_per_epoch, -1):
            image, token = move_to(images[batch], device), move_to(tokens[batch], device)
            flip = torch.rand(len(batch), device=device) < 0.5   # the one augmentation: a mirror drawing
            image = torch.where(flip.view(-1, 1, 1, 1), image.flip(3), image)
            image = (image.float() / 255 - mean) / std
            set_learning_rates(optimizer, lr_factor(step, total_steps, warmup_steps, args.min_lr_ratio))
            image_emb, text_emb = clip_model.encode_image(image), clip_model.encode_text(token)
            loss = clip_loss(image_emb, text_emb, clip_model.logit_scale)
            if not math.isfinite(loss.item()):
                raise SystemExit(f"non-finite CLIP loss at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(clip_model.parameters(), args.grad_clip)
            optimizer.step()
            with torch.no_grad():   # CLIP's cap on its temperature, applied to the parameter as CLIP does
                clip_model.logit_scale.clamp_(0, math.log(100.0))
            hits = (image_emb @ text_emb.t()).argmax(1) == torch.arange(len(batch), device=device)
            totals += [loss.item() * len(batch), float(hits.sum()), len(batch)]
            step += 1
        history.append({"epoch": epoch + 1, "loss": totals[0] / totals[2], "top1": totals[1] / totals[2],
                        "temperature": clip_model.logit_scale.exp().item(), "seconds": time.time() - start})
        print(f"epoch {epoch + 1}/{args.epochs}  loss {history[-1]['loss']:.3f}  in-batch top-1 "
              f"{history[-1]['top1']:.3f}  logit scale {history[-1]['temperature']:.1f}  "
              f"({history[-1]['seconds']:.0f}s)", flush=True)
    clip_model.eval()
    with torch.no_grad():
        prompts = clip_loader.tokenize(CILFConfig().prompts(), DEMO_CLIP["context_length"]).to(device)
        order = prompt_age_order(clip_model.encode_text(prompts), CILFConfig().ages())
    path = out / "demo_clip.pt"
    save_checkpoint(path, {k: v.detach().cpu() for k, v in clip_model.state_dict().items()})
    record = {"file": path.name, "sha256": clip_loader.sha256(path), "architecture": DEMO_CLIP, "prompt_age_order": order,
              "options": pretrain_options(args),
              "history": history, "rebuild": "python train.py --objective clip"}
    write_json(out / "demo_clip.json", record)
    print(f"demo CLIP written to {path} (SHA-256 {record['sha256']}); age prompts' order: Spearman "
          f"{order:.3f} over {time.time() - start:.0f}s", flush=True)
    return record


def render_corpus(args):
    """The whole pretraining corpus, drawn once at the demo CLIP's input size: (images (n, 3, R, R) uint8,
    caption tokens (n, L)). Drawn by --workers processes; every epoch then reads it from memory."""
    resolution = DEMO_CLIP["image_resolution"]
    corpus = data.CaptionedDrawings(args.corpus_size, args.seed, data.T.PILToTensor(), resolution,
                                    DEMO_CLIP["context_length"], args.caption_age_rate)
    loader = torch.utils.data.DataLoader(corpus, batch_size=1024, num_workers=args.workers)
    parts = list(loader)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------- 5. the run folder (--out)

# The run folder (--out): config.json (resolved options and model config), log.jsonl (one line per optimizer
# step with the loss parts, one per epoch with the metrics, one with the final test result), last.pt and
# best.pt (by validation MAE). Both checkpoints hold model, optimizer, scaler (the fp16 GradScaler's state),
# scheduler, step, epoch, config (plain data), best_val_mae and history; they are written atomically, so a
# run killed at any moment (even SIGKILL) resumes from its last finished epoch and ends with the same
# weights as a run never stopped: each epoch's shuffle, augmentation and dropout are functions of (seed,
# epoch, rank) alone, since every epoch reseeds every generator (so no RNG state is saved; the one that
# earlier versions saved in last.pt is ignored). Nothing is lost or silently mixed: config.json and the
# checkpoints store absolute paths and the dataset's fingerprint (a changed dataset is refused on resume
# unless --allow-data-change, which is recorded), LOCK_FILE keeps a second train.py out of a running
# folder, a folder holding files train.py did not write is refused, and best.pt is never replaced by a run
# with other options. At the end, best.pt is calibrated on the calibration part of the validation split (it
# chose nothing): u's scale in years and eval.py's conformal age intervals (calibration: the scale and
# quantiles for the levels 0.8, 0.9, 0.95; eval.calibrate), and rewritten atomically.

# The lock a running train.py holds in its run folder (see claim_run_folder).
LOCK_FILE = ".lock"


def claim_run_folder(out):
    """Create --out if needed, refuse it when it holds files train.py did not write (an unrelated folder
    would get its config.json and log.jsonl overwritten), and hold its lock file for the rest of the
    process: a second train.py into the same folder is refused while this one runs. The lock is a POSIX
    record lock (lockf), which the OS releases when the process ends, even by SIGKILL, so no lock goes
    stale; unlike flock it is not inherited by DataLoader workers, which may outlive a killed parent."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot be used as a run folder ({e.strerror or e})") from None
    ours = [p.name for p in out.iterdir() if p.name != LOCK_FILE and not re.fullmatch(r"\..*\.tmp\d+", p.name)]
    if ours and not is_run_config(out / "config.json"):
        raise SystemExit(f"--out {out} holds files train.py did not write ({', '.join(sorted(ours)[:5])}"
                         f"{' ...' if len(ours) > 5 else ''}); choose a new or empty folder")
    lock = open(out / LOCK_FILE, "a+", encoding="utf-8")
    if fcntl is not None:   # POSIX; elsewhere runs are not locked
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise SystemExit(f"--out {out} is in use by another train.py ({holder}); wait for it to finish "
                             f"or choose another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def is_run_config(path):
    """Whether path is a config.json written by train.py."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("train"), dict) and "model" in config


def build_run_config(args, world, options, config, clip_model, splits, data_index):
    """What config.json holds (and both checkpoints): the resolved options with the dataset options used,
    the model's config, where the CLIP came from, and the dataset's fingerprint over data_index."""
    return {"train": {**vars(args), "dataset_options": options, "world_size": world},
            "model": dataclasses.asdict(config),
            "clip": {**clip_source_record(args), **clip_record(clip_model)},
            "data": {"fingerprint": data.fingerprint(data_index), "images": len(data_index),
                     "root": splits["train"].root, "changes": []}}   # root: what data_index paths are relative to


def clip_source_record(args):
    """config.json's "clip" source: the file the run's CLIP came from (with its SHA-256 for the demo
    CLIP), or "random" with the demo architecture."""
    if args.clip == "random":
        return {"source": "random", **DEMO_CLIP}
    if args.clip == str(DEMO_CLIP_FILE):
        return {"source": str(DEMO_CLIP_FILE), "sha256": clip_loader.sha256(DEMO_CLIP_FILE), **DEMO_CLIP}
    return {"source": args.clip}


def resume_checkpoint(args, out):
    """The checkpoint to continue from (out/last.pt), None for a new run; --resume demands one."""
    path = out / "last.pt"
    for leftover in out.glob(".*.tmp*") if out.is_dir() else []:
        leftover.unlink(missing_ok=True)   # a write interrupted by a kill; the real file is intact
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise SystemExit(f"{path} is a folder or special file, not a checkpoint: move it away, or choose another --out")
    if not path.exists():
        if args.resume:
            raise SystemExit(f"--resume: no checkpoint to continue from ({path} does not exist)")
        return None
    ckpt = exit_on_checkpoint_error(load_checkpoint, path)
    check_resumable(ckpt, path)
    check_saved_options(ckpt["config"]["train"], path)
    return ckpt


# The run state in last.pt beside the model and its config, as train.py writes it (bool is an int to Python).
RESUME_FIELDS = {"step": int, "epoch": int, "log_offset": int, "best_val_mae": (int, float), "history": list,
                 "optimizer": dict}


def check_resumable(ckpt, path):
    """Refuse a last.pt that torch reads but whose run state is not what train.py writes (edited by hand or
    written by another program), naming the fields, before anything is built: not a traceback mid-setup."""
    def problem(value, kind):
        if value is None:
            return "missing"
        if isinstance(value, bool) or not isinstance(value, kind):   # bool is an int to isinstance
            return f"a {type(value).__name__}"
        return f"negative: {value}" if kind is int and value < 0 else None

    fields = {**{k: (ckpt.get(k), kind) for k, kind in RESUME_FIELDS.items()},
              "config.train": (ckpt["config"].get("train"), dict)}
    bad = [f"{k} ({problem(*v)})" for k, v in fields.items() if problem(*v)]
    if bad:
        raise SystemExit(f"{path}: cannot continue from it: run state not as train.py writes it: {', '.join(bad)}; "
                         f"move it away to start the run again, or choose another --out")


def check_saved_options(saved, path):
    """Refuse a checkpoint whose saved options (config.train) hold a value that this train.py's parser
    could not have produced (eval.saved_option_problem): one line naming the file and the field, where
    comparing it with this run's options would report a different run, or fail. Saved fields that are no
    option (world_size, dataset_options, options of earlier versions) are left to check_same_run."""
    actions = {action.dest: action for action in option_parser()._actions}
    for name, value in saved.items():
        problem = name in actions and saved_option_problem(actions[name], value)
        if problem:
            raise SystemExit(f"{path}: config.train.{name}: {problem} (not as train.py writes it); move it away "
                             f"to start the run again, or choose another --out")


def resume_state(ckpt, out, run_config, data_index, args, rank, raw_model, optimizer, scaler):
    """The run state to start from: step, epoch, best_val_mae, history, log_offset (and rank). A new run
    (ckpt None) starts at zero, once a best.pt left in the folder is known to be this run's. A run that
    continues from last.pt (ckpt) is refused if its options or its data changed; otherwise the model, the
    optimizer and the fp16 scaler are restored from it in place (the RNGs need not be: every epoch reseeds
    them)."""
    state = {"step": 0, "epoch": 0, "rank": rank, "best_val_mae": float("inf"), "history": [], "log_offset": 0}
    if ckpt is None:
        if rank == 0:
            check_best_is_ours(run_config, out)
        return state
    check_same_run(ckpt["config"], run_config, out)
    check_same_data(ckpt, run_config, data_index, args, out)
    path = out / "last.pt"
    restore_or_exit(path, "model", raw_model.load_state_dict, ckpt["model"])
    restore_or_exit(path, "optimizer", optimizer.load_state_dict, ckpt["optimizer"])
    if ckpt.get("scaler"):   # {} from a run without fp16 (a disabled scaler ignores what it is given)
        restore_or_exit(path, "scaler", scaler.load_state_dict, ckpt["scaler"])
    state.update(step=ckpt["step"], epoch=ckpt["epoch"], best_val_mae=ckpt["best_val_mae"],
                 history=ckpt["history"], log_offset=ckpt["log_offset"])
    return state


def restore_or_exit(path, what, function, *args):
    """function(*args), which restores `what` from the checkpoint at path: a part whose contents are not what
    train.py wrote (other keys, shapes or sizes) stops the run with one line naming the file and the part."""
    try:
        return function(*args)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{path}: cannot continue from it: its {what} cannot be restored "
                         f"({clip_loader.error_line(e)}); move it away to start the run again, or choose another --out") from None


def check_same_run(saved, current, out):
    """Refuse to continue a run with different options: the result would match neither."""
    a, b = saved["train"], json.loads(json.dumps(current["train"]))
    diff = [f"--{k.replace('_', '-')}: {shortened(a.get(k))} in the run, {shortened(b.get(k))} now"
            for k in sorted((set(a) | set(b)) - RUNTIME_OPTIONS) if a.get(k) != b.get(k)]
    if diff:
        raise SystemExit(f"{out} holds a run with other options ({'; '.join(diff)}). Rerun with the run's "
                         f"options (see {out / 'config.json'}) or choose another --out.")


def shortened(value, limit=60):
    """A value for a message: its repr, cut after `limit` characters ("..." marks the cut), since a value read
    from a file may be megabytes long; by its type where Python will not print it (an integer of more than
    4300 digits, inside a list too)."""
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__} too long to print"
    return text if len(text) <= limit else text[:limit] + "..."


def check_best_is_ours(run_config, out):
    """A new run in a folder that still holds a best.pt (its last.pt deleted) may only be the same run
    started again: a run with other options would replace that result."""
    if (out / "best.pt").exists():
        best = exit_on_checkpoint_error(load_checkpoint, out / "best.pt")
        check_saved_options(best["config"]["train"], out / "best.pt")
        check_same_run(best["config"], run_config, out)


def check_same_data(ckpt, run_config, data_index, args, out):
    """Refuse to continue a run whose dataset changed (another fingerprint): the seeded split would move
    images between train and test. With --allow-data-change the change is recorded in run_config."""
    saved = ckpt["config"].get("data")
    if not saved:   # a run from before fingerprints were stored
        return
    current = run_config["data"]
    current["changes"] = list(saved.get("changes", []))
    if saved["fingerprint"] == current["fingerprint"]:
        return
    change = data.describe_change(ckpt.get("data_index", []), data_index) or "the file list differs"
    if not args.allow_data_change:
        raise SystemExit(f"the dataset changed since the run in {out} started: {change}. Its splits are seeded "
                         f"from the file list, so images may have moved between train and test. Restore the data, "
                         f"choose another --out, or pass --allow-data-change to continue anyway (recorded).")
    current["changes"].append({"after_epoch": ckpt["epoch"], "from": saved["fingerprint"],
                               "to": current["fingerprint"], "what": change})
    print(f"warning: --allow-data-change: continuing after epoch {ckpt['epoch']} on changed data: {change}",
          file=sys.stderr)


def save_checkpoint(path, obj):
    """Atomic write (eval.atomic_write): a kill at any moment leaves either the old file or the new one,
    never a torn one; a full disk raises OSError naming the file and leaves no temporary file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_epoch_checkpoints(out, ckpt, improved):
    """Write an epoch's checkpoint as last.pt, and as best.pt too when the epoch improved on validation. best
    first: a kill between the two writes leaves last.pt older than best.pt, and the rerun of that epoch
    rewrites both identically. A full disk stops the run saying how to continue."""
    try:
        if improved:
            save_checkpoint(out / "best.pt", ckpt)
        save_checkpoint(out / "last.pt", ckpt)
    except OSError as e:
        raise SystemExit(f"{e}. The run stopped; free space and rerun the same command to continue "
                         f"from the last checkpoint written.") from None


def open_log(out, offset, rank):
    """log.jsonl appender for rank 0 (others get a no-op). On resume the lines written after the
    checkpoint (steps that will be redone) are cut off, so the log matches an uninterrupted run. A log
    shorter than the checkpoint expects (deleted, or cut) is continued where it ends, never padded, with a
    line saying what is missing."""
    if rank != 0:
        logger = lambda record: None
        logger.offset = lambda: 0
        return logger
    out.mkdir(parents=True, exist_ok=True)
    path = out / "log.jsonl"
    f = open(path, "r+b" if path.exists() else "wb")
    size = f.seek(0, os.SEEK_END)
    missing = offset - size if size < offset else 0
    f.truncate(min(offset, size))   # truncate() past the end would pad with NUL bytes
    f.seek(min(offset, size))

    def logger(record):
        f.write((json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
    logger.offset = f.tell
    if missing:
        logger({"type": "note", "text": f"log.jsonl was {missing} bytes shorter than the checkpoint expects: "
                                        f"the lines before this one are incomplete"})
        print(f"warning: {path} is shorter than the checkpoint expects; continuing it as it is", file=sys.stderr)
    return logger


def lower_lr_command(args, argv):
    """The command line of this run with a tenfold lower --lr, into a new --out: a run that can start, where
    rerunning into this --out would be refused."""
    drop = {"--out": 1, "--lr": 1, "--resume": 0}
    kept, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in drop:
            i += 1 + (drop[name] if "=" not in argv[i] else 0)
            continue
        kept.append(argv[i])
        i += 1
    lr = args.lr / 10
    return shlex.join(["python", "train.py", *kept, "--lr", f"{lr:g}", "--out", f"{args.out}_lr{lr:g}"])


if __name__ == "__main__":
    main()
