"""Distributed training on the CPU (gloo): DDP survives every ablation; the contrastive loss and the gradients
of two processes with batch 4 equal one process with batch 8; `python train.py`, torchrun with one process and
two torchrun launches joined as two nodes (c10d rendezvous on 127.0.0.1) train on the same batches and end with
the same weights; a checkpoint of an earlier version, holding more CUDA RNG states than the machine has GPUs,
resumes to the weights of a run never stopped; the feedback designs, the language controls and the per-image
label sigma train under DDP as well."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clip_loader
import train
from model import CILFCIAE
from test_train import comparable, stop_in_epoch_2

ROOT = Path(__file__).resolve().parents[1]
# tests/test_train.py's tiny model (every module on, the demo CLIP's architecture with random weights, so the
# text tower trains too), with 32 training images: 2 steps of 16
TINY = ["--synthetic-n", "32", "16", "16", "--depth", "1", "--width", "32", "--heads", "2", "--feedback-hidden", "32",
        "--batch-size", "16", "--clip", "random", "--epochs", "1", "--device", "cpu"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_process_group(rank, world, port):
    """The environment torchrun gives a process, and (for code that does not call train.main) the group."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def log_lines(out, kind):
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["type"] == kind]


# --------------------------------------------------------------------------- DDP survives every option

# --feedback-weight 0 alone: y0's L1 still reaches the feedback's parameters, with zeros, through the stack of
# all steps' estimates (see the next test); with --l1-weight 0 beside it, most of them get no gradient at all
# The feedback designs and the language controls change what is built: a frozen tower beside the trained one
# (anchored), a rating MLP of its own (residual), a saved buffer in place of the text tower (text-random), a
# narrower query (feedback-text off).
ABLATIONS = [["--uncertainty-weight", "0"], ["--feedback-weight", "0"], ["--feedback-weight", "0", "--l1-weight", "0"],
             ["--contrastive-weight", "0"], ["--feedback-steps", "0"], ["--feedback-design", "anchored"],
             ["--feedback-design", "residual"], ["--text-embeddings", "random", "--text-tower", "freeze"],
             ["--feedback-text", "off"]]


EVERY_PART = {"distribution", "l1", "contrastive", "feedback", "uncertainty"}


def folder(ablation):
    return "".join(ablation).replace("--", "_")


def train_ablations(rank, ports, out):
    for ablation, port in zip(ABLATIONS, ports):
        join_process_group(rank, 2, port)
        train.main([*TINY, *ablation, "--workers", "0", "--out", str(out / folder(ablation))])


def test_two_processes_train_every_ablation(tmp_path, monkeypatch):
    """The first and the third leave parameters without a gradient (the rating head, most of the feedback):
    DDP stopped at the second step with "Expected to have finished reduction"; the others change the graph."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # read when the spawned processes import torch
    mp.spawn(train_ablations, args=([free_port() for _ in ABLATIONS], tmp_path), nprocs=2)
    parts = {}
    for ablation in ABLATIONS:
        steps = log_lines(tmp_path / folder(ablation), "step")
        assert [s["step"] for s in steps] == [0, 1], ablation
        assert json.loads((tmp_path / folder(ablation) / "config.json").read_text())["train"]["world_size"] == 2
        parts[" ".join(ablation)] = set(steps[0]) - {"type", "epoch", "step", "lr_factor", "loss"}
    assert parts == {"--uncertainty-weight 0": {"distribution", "l1", "contrastive", "feedback"},
                     "--feedback-weight 0": {"distribution", "l1", "contrastive", "uncertainty"},
                     "--feedback-weight 0 --l1-weight 0": {"distribution", "contrastive", "uncertainty"},
                     "--contrastive-weight 0": {"distribution", "l1", "feedback", "uncertainty"},
                     "--feedback-steps 0": {"distribution", "l1", "contrastive"},
                     **{" ".join(ablation): EVERY_PART for ablation in ABLATIONS[5:]}}


def test_freeze_untrained_finds_exactly_the_parameters_without_gradient():
    """Hand count: with --uncertainty-weight 0 only the rating head of HypothesisFeedback gets no gradient.
    With --feedback-weight 0 the L1 on y0 still reaches every feedback part, with a gradient of zeros (it
    reads column 0 of the stacked estimates y0..yR, whose backward sends zeros to the others), as DDP's
    hooks would see it; with --l1-weight 0 too, every part but the rating head (its input is detached)."""
    def frozen(*options):
        torch.manual_seed(0)
        args = train.parse_args([*TINY, *options])
        model = CILFCIAE(train.build_clip(args), train.build_config(args))
        names = train.freeze_untrained(model, torch.device("cpu"))
        assert all(not p.requires_grad for n, p in model.named_parameters() if n in names)
        return {n.split(".")[1] for n in names}, names
    assert frozen() == (set(), [])
    assert frozen("--uncertainty-weight", "0")[0] == {"rating"}
    assert frozen("--feedback-weight", "0") == (set(), [])
    assert frozen("--feedback-weight", "0", "--l1-weight", "0")[0] == {"query", "step_embedding", "token_norm",
                                                                       "key", "value", "correction"}


# --------------------------------------------------------------------------- one loss over the global batch

def batch_of_eight():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=generator), torch.tensor([3., 17, 17, 40, 41, 66, 90, 3])


def tiny_model():
    torch.manual_seed(0)
    args = train.parse_args([*TINY, "--feedback-noise", "0"])
    return CILFCIAE(clip_loader.CLIP(**train.DEMO_CLIP), train.build_config(args)).train()


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def ddp_contrastive_gradients(rank, port, out):
    join_process_group(rank, 2, port)
    dist.init_process_group("gloo")
    model = tiny_model()
    images, ages = batch_of_eight()
    share = slice(4 * rank, 4 * rank + 4)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss, parts = model.loss(ddp(images[share]), ages[share], train.GatherFromProcesses.apply)
    loss.backward()
    if rank == 0:
        torch.save({"contrastive": parts["contrastive"].detach(), "grads": gradients(model)}, out)
    dist.destroy_process_group()


def test_contrastive_loss_and_gradients_of_two_processes_equal_one_with_their_batch(tmp_path):
    mp.spawn(ddp_contrastive_gradients, args=(free_port(), tmp_path / "ddp.pt"), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    model = tiny_model()
    images, ages = batch_of_eight()
    loss, parts = model.loss(model(images), ages)
    loss.backward()   # the other parts are means over the images: DDP's mean of two halves is this mean
    one = gradients(model)
    torch.testing.assert_close(ddp["contrastive"], parts["contrastive"].detach(), rtol=1e-6, atol=0)
    assert ddp["grads"].keys() == one.keys() and any(k.startswith("clip.transformer") for k in one)   # text tower
    for k in one:
        torch.testing.assert_close(ddp["grads"][k], one[k], rtol=1e-4, atol=1e-5 * float(one[k].abs().max()),
                                   msg=lambda m: f"{k}: {m}")   # atol: rounding in sums of another order


# --------------------------------------------------------------------------- one run whatever the launcher

def run_script(args):
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_python_torchrun_and_two_nodes_train_the_same_run(tmp_path):
    """One process as `python train.py` (train.main, here in the test's process: the same code path), one
    under torchrun, and two torchrun launches that join as two nodes of one process each through a c10d
    rendezvous on 127.0.0.1, sharing the run folder: the same batches (every step's loss parts, the
    contrastive loss over the global batch included) and the same weights. The feedback's perturbation of
    hypotheses is off: each process draws its own."""
    common = [*TINY, "--feedback-noise", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    port = free_port()
    nodes = [run_script([*torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test", "--local-addr", "127.0.0.1",
                         "train.py", *common, "--out", str(tmp_path / "nodes")]) for _ in range(2)]
    single = run_script([*torchrun, "--standalone", "--nproc_per_node", "1", "train.py", *common,
                         "--out", str(tmp_path / "torchrun")])
    train.main([*common, "--out", str(tmp_path / "python")])
    for proc in [*nodes, single]:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "nodes" / "config.json").read_text())["train"]["world_size"] == 2
    reference = log_lines(tmp_path / "python", "step")
    assert len(reference) == 2 and "contrastive" in reference[0]
    for run in ("torchrun", "nodes"):
        steps = log_lines(tmp_path / run, "step")
        assert [s.keys() for s in steps] == [s.keys() for s in reference]
        for got, want in zip(steps, reference):
            assert {k: pytest.approx(v, rel=1e-5) for k, v in want.items() if k != "type"} == \
                   {k: v for k, v in got.items() if k != "type"}, run
        a = comparable(torch.load(tmp_path / "python" / "last.pt", weights_only=True)["model"])
        b = comparable(torch.load(tmp_path / run / "last.pt", weights_only=True)["model"])
        for k in a:
            # atol: a tenth of one AdamW step (lr 1e-3), which an element whose gradient is near zero takes in
            # a direction that rounding (sums of another order) decides
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{run}: {k}: {m}")


def test_per_image_label_sigma_is_the_same_run_on_one_process_and_on_two(tmp_path):
    """--label-sigma age-std on a CSV whose rows give apparent-age stds: each std travels with its image to
    the loss on whichever process the image lands, so torchrun with two processes of batch 4 trains the run
    one process trains with batch 8 (the same step losses and weights)."""
    from PIL import Image
    import data
    import numpy as np
    rows = ["path,age,age_std,split"]
    for i in range(24):
        Image.fromarray(data.render_synthetic(4 * i, np.random.default_rng(i), 32)).save(tmp_path / f"{i}.png")
        split = "train" if i < 16 else "val" if i < 20 else "test"
        rows.append(f"{i}.png,{4 * i},{0.5 + i % 7},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    common = ["--dataset", "csv", "--data-root", str(tmp_path / "labels.csv"), "--label-sigma", "age-std",
              "--depth", "1", "--width", "32", "--heads", "2", "--feedback-hidden", "32", "--batch-size", "8",
              "--clip", "random", "--epochs", "1", "--device", "cpu", "--feedback-noise", "0", "--workers", "0"]
    two = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "train.py", *common, "--out", str(tmp_path / "two")])
    train.main([*common, "--out", str(tmp_path / "one")])
    _, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["train"]["world_size"] == 2 and config["model"]["label_sigma"] == "age-std"
    reference, steps = log_lines(tmp_path / "one", "step"), log_lines(tmp_path / "two", "step")
    assert len(reference) == 2 and [s.keys() for s in steps] == [s.keys() for s in reference]
    for got, want in zip(steps, reference):
        assert {k: pytest.approx(v, rel=1e-5) for k, v in want.items() if k != "type"} == \
               {k: v for k, v in got.items() if k != "type"}
    a = comparable(torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"])
    b = comparable(torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"])
    for k in a:   # atol: as above, a tenth of one AdamW step
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")


# --------------------------------------------------------------------------- resume on another machine

def test_a_checkpoint_with_more_cuda_rng_states_than_gpus_resumes(tmp_path, monkeypatch, capsys):
    """Earlier versions saved the RNG states in last.pt, one CUDA state per GPU of the machine (8 on an 8-GPU
    node), and restored them all, which fails on a machine with fewer. Every epoch reseeds every generator,
    so nothing is restored now: such a last.pt, stopped after epoch 1, resumes (its "rng" ignored) to the
    weights of a run never stopped, and the checkpoints written now hold no RNG state."""
    common = [*TINY, "--epochs", "2"]
    train.main([*common, "--out", str(tmp_path / "straight")])
    stop_in_epoch_2(monkeypatch, [*common, "--out", str(tmp_path / "stopped")])
    ckpt = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and "rng" not in ckpt
    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    ckpt["rng"] = {"torch": torch.get_rng_state(), "cuda": eight}   # as an 8-GPU node wrote it
    train.save_checkpoint(tmp_path / "stopped" / "last.pt", ckpt)
    capsys.readouterr()
    train.main([*common, "--out", str(tmp_path / "stopped")])
    assert "resumed after epoch 1" in capsys.readouterr().out
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and "rng" not in resumed
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
