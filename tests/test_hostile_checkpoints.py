"""Hostile checkpoint files (issue 13): each class of attack a security review found, built here from
bytes, is refused with one CheckpointError naming the file, within seconds, with a bounded rise of
peak memory, leaving the loader unchanged; eval.py --ckpt and train.py --resume exit with one line.

Files are written with a small pickle assembler (protocol 2, the opcodes torch's writers use), so each
attack differs from an honest file only in the attack; the honest files it writes load. Every hostile
load runs in one child process (a crash there is a failed test, not a crashed test run) that reports,
per file: the exception, the seconds taken, the rise of peak RSS (VmHWM, reset before each file) and
whether any function or class of clip_loader or torch's rebuild function changed.
"""
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import clip_loader as cl

ROOT = Path(__file__).resolve().parents[1]
P = pickle  # opcode names: P.MARK, P.TUPLE, ...
TINY_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=8, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=1)


class Pickle:
    """Protocol-2 pickle bytes, opcode by opcode, as torch.save and TorchScript write them."""

    def __init__(self):
        self.out = bytearray(P.PROTO + b"\x02")

    def raw(self, *codes):
        for code in codes:
            self.out += code
        return self

    def int(self, n):
        return self.raw(P.BININT + struct.pack("<i", n))

    def str(self, s):
        data = s.encode()
        return self.raw(P.BINUNICODE + struct.pack("<I", len(data)) + data)

    def glob(self, module, name):
        return self.raw(P.GLOBAL + f"{module}\n{name}\n".encode())

    def put(self, i):
        return self.raw(P.LONG_BINPUT + struct.pack("<I", i))

    def get(self, i):
        return self.raw(P.LONG_BINGET + struct.pack("<I", i))

    def ints(self, values):
        self.raw(P.MARK)
        for v in values:
            self.int(v)
        return self.raw(P.TUPLE)

    def storage(self, key, numel, location=None, dtype="FloatStorage"):
        """A persistent id ('storage', type, key, location, numel); location: emits it, default 'cpu'."""
        self.raw(P.MARK).str("storage").glob("torch", dtype).str(key)
        (location or (lambda p: p.str("cpu")))(self)
        return self.int(numel).raw(P.TUPLE, P.BINPERSID)

    def tensor(self, key, numel, offset, size, stride, location=None):
        """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())"""
        self.glob("torch._utils", "_rebuild_tensor_v2").raw(P.MARK)
        self.storage(key, numel, location).int(offset).ints(size).ints(stride).raw(P.NEWFALSE)
        self.glob("collections", "OrderedDict").raw(P.EMPTY_TUPLE, P.REDUCE)
        return self.raw(P.TUPLE, P.REDUCE)

    def module(self, fields, name="Module"):
        """A TorchScript object: NEWOBJ of __torch__.<name>, BUILD with {key: value}; fields maps keys
        to functions that emit the value."""
        self.glob("__torch__", name).raw(P.EMPTY_TUPLE, P.NEWOBJ, P.EMPTY_DICT, P.MARK)
        for key, emit in fields.items():
            self.str(key)
            emit(self)
        return self.raw(P.SETITEMS, P.BUILD)

    def dict(self, fields):
        self.raw(P.EMPTY_DICT, P.MARK)
        for key, emit in fields.items():
            self.str(key)
            emit(self)
        return self.raw(P.SETITEMS)

    def done(self):
        return bytes(self.out + P.STOP)


def floats(n, value=1.0):
    return struct.pack(f"<{n}f", *[value] * n)


def write_archive(path, data_pkl, records=None, compression=zipfile.ZIP_STORED):
    """A TorchScript-shaped archive (constants.pkl marks it as one): a/data.pkl, a/data/<key>."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", data_pkl)
        z.writestr("a/constants.pkl", P.PROTO + b"\x02" + P.EMPTY_TUPLE + P.STOP)
        z.writestr("a/version", "3\n")
        for key, raw in (records or {}).items():
            z.writestr(zipfile.ZipInfo(f"a/data/{key}"), raw, compress_type=compression)
    return path


def write_torch_file(path, data_pkl, records=None, compression=zipfile.ZIP_STORED):
    """torch.save's layout (its version, byteorder, ... records) with data.pkl and data/<key> replaced."""
    torch.save({}, path)
    with zipfile.ZipFile(path) as z:
        kept = {i.filename: z.read(i) for i in z.infolist() if "/data" not in i.filename}
        prefix = next(i.filename for i in z.infolist() if i.filename.endswith("data.pkl"))[:-len("data.pkl")]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(prefix + "data.pkl", data_pkl)
        for name, raw in kept.items():
            z.writestr(name, raw)
        for key, raw in (records or {}).items():
            z.writestr(zipfile.ZipInfo(f"{prefix}data/{key}"), raw, compress_type=compression)
    return path


def write_safetensors(path, header, data=b"", length=None):
    head = json.dumps(header).encode() if isinstance(header, dict) else header
    Path(path).write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


# --------------------------------------------------------------------------- the assembler writes honest files

def test_assembled_honest_files_load(tmp_path):
    """The same assembler, without an attack, writes files both readers accept with the right values."""
    weight = lambda p: p.tensor("0", 6, 0, (2, 3), (3, 1))
    transposed = lambda p: p.tensor("0", 6, 0, (3, 2), (1, 3))
    tree = Pickle().module({"visual": lambda p: p.module({"w": weight, "t": transposed}), "scale": lambda p: p.int(3)})
    record = struct.pack("<6f", *range(6))
    state = cl.read_state_dict(write_archive(tmp_path / "ok.pt", tree.done(), {"0": record}))
    assert set(state) == {"visual.w", "visual.t"}
    assert torch.equal(state["visual.w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(state["visual.t"], torch.arange(6.0).reshape(2, 3).t())
    # an empty record's storage cannot be grown afterwards
    empty = Pickle().module({"e": lambda p: p.tensor("1", 0, 0, (0, 3), (3, 1))}).done()
    state = cl.read_state_dict(write_archive(tmp_path / "empty.pt", empty, {"1": b""}))
    assert state["e"].shape == (0, 3)
    with pytest.raises(RuntimeError, match="not resizable"):
        state["e"].untyped_storage().resize_(1 << 20)
    plain = Pickle().dict({"w": weight}).done()
    loaded = cl.safe_torch_load(write_torch_file(tmp_path / "ok_torch.pt", plain, {"0": record}))
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))
    # torch's own files pass the scan: a state dict (OrderedDict with _metadata: BUILD) and plain data
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    torch.save({"model": model.state_dict(), "rng": torch.get_rng_state(), "set": {1, 2}, "bytes": b"x",
                "nested": [(1.5, None, True, -7, 2 ** 70, "s")]}, tmp_path / "honest.pt")
    loaded = cl.safe_torch_load(tmp_path / "honest.pt")
    assert torch.equal(loaded["model"]["0.weight"], model[0].weight) and loaded["nested"][0][4] == 2 ** 70


# --------------------------------------------------------------------------- the attack files

def deep_tuple_key(depth):
    """{((((),),),...): None}: hashing the key recursed in C and crashed CPython."""
    p = Pickle().raw(P.EMPTY_DICT, P.EMPTY_TUPLE)
    p.out += P.TUPLE1 * depth
    return p.raw(P.NONE, P.SETITEM).done()


def shared_list(levels):
    """Emits L_levels where L_0 = [] and L_k = [L_{k-1}, L_{k-1}]: 2^levels paths, all one object."""
    def emit(p):
        p.raw(P.MARK, P.EMPTY_LIST).put(0)
        for k in range(1, levels + 1):
            p.raw(P.EMPTY_LIST).put(k).raw(P.MARK).get(k - 1).get(k - 1).raw(P.APPENDS)
        return p.raw(P.TUPLE)
    return emit


def shared_modules(levels):
    """M_0 holds a tensor; M_k = module {a: M_{k-1}, b: M_{k-1}}: a walk per path visits 2^levels."""
    p = Pickle().raw(P.MARK).module({"w": lambda q: q.tensor("0", 4, 0, (4,), (1,))}).put(0)
    for k in range(1, levels + 1):
        p.module({"a": lambda q, k=k: q.get(k - 1), "b": lambda q, k=k: q.get(k - 1)}).put(k)
    return p.raw(P.TUPLE).done()  # (M_0, ..., M_levels): the tree is the last


def nested_lists(depth):
    p = Pickle()
    p.out += P.EMPTY_LIST * depth + P.APPEND * (depth - 1)
    return p.done()


def nested_modules(depth):
    """Modules each holding the next as "child", depth levels (the innermost with an empty state)."""
    p = Pickle()
    for _ in range(depth):
        p.glob("__torch__", "M").raw(P.EMPTY_TUPLE, P.NEWOBJ, P.EMPTY_DICT).str("child")
    p.glob("__torch__", "M").raw(P.EMPTY_TUPLE, P.NEWOBJ, P.EMPTY_DICT, P.BUILD)
    p.out += (P.SETITEM + P.BUILD) * depth
    return p.done()


def cyclic_module():
    """A module whose state holds the module itself."""
    p = Pickle().glob("__torch__", "M").raw(P.EMPTY_TUPLE, P.NEWOBJ).put(0)
    return p.dict({"self": lambda q: q.get(0), "w": lambda q: q.tensor("0", 4, 0, (4,), (1,))}).raw(P.BUILD).done()


def build_on(target_emit, state_emit):
    return Pickle().module({"x": lambda p: state_emit(target_emit(p)).raw(P.BUILD)}).done()


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def attack_files(d):
    """{case: (reader, path)}: one or more files per attack class of the issue."""
    d = Path(d)
    four = {"0": floats(4)}
    files = {}
    add = lambda case, reader, path: files.__setitem__(case, (reader, str(path)))
    # crash: a tuple nested a million deep, used as a dict key
    add("crash/deep tuple key, torch file", "load", write_torch_file(d / "deep.pt", deep_tuple_key(1_000_000)))
    add("crash/deep tuple key, archive", "load", write_archive(
        d / "deep_jit.pt", Pickle().module({"k": lambda p: p.raw(P.EMPTY_DICT, P.EMPTY_TUPLE, P.TUPLE1 * 100_000,
                                                                   P.NONE, P.SETITEM)}).done()))
    # hang: a persistent id whose location is a list shared with itself at every level
    add("hang/shared-list persistent id, archive", "load", write_archive(
        d / "pid_jit.pt", Pickle().module({"w": lambda p: p.tensor("0", 4, 0, (4,), (1,), shared_list(64))}).done(), four))
    add("hang/shared-list persistent id, torch file", "load", write_torch_file(
        d / "pid.pt", Pickle().dict({"w": lambda p: p.tensor("0", 4, 0, (4,), (1,), shared_list(64))}).done(), four))
    add("hang/shared module tree", "load", write_archive(d / "tree_jit.pt", shared_modules(64), four))
    add("hang/cyclic module", "load", write_archive(d / "cycle_jit.pt", cyclic_module(), four))
    add("hang/list containing itself", "torch", write_torch_file(
        d / "cycle.pt", Pickle().raw(P.EMPTY_LIST).put(0).get(0).raw(P.APPEND).done()))
    add("hang/5000 nested lists", "torch", write_torch_file(d / "nest.pt", nested_lists(5000)))
    add("hang/5000 nested modules", "load", write_archive(d / "nest_jit.pt", nested_modules(5000)))
    # allocate: a memo index of 2^27, compressed records, safetensors ranges, a stride-0 tensor
    memo = Pickle().raw(P.NONE).put(2 ** 27).done()
    add("allocate/memo index 2^27, archive", "load", write_archive(d / "memo_jit.pt", memo))
    add("allocate/memo index 2^27, torch file", "torch", write_torch_file(d / "memo.pt", memo))
    tensor32m = Pickle().module({"w": lambda p: p.tensor("0", 8 << 20, 0, (8 << 20,), (1,))}).done()
    add("allocate/bzip2 record, archive", "load", write_archive(
        d / "bz2_jit.pt", tensor32m, {"0": bytes(32 << 20)}, zipfile.ZIP_BZIP2))
    add("allocate/deflate record, torch file", "torch", write_torch_file(
        d / "deflate.pt", Pickle().dict({"w": lambda p: p.tensor("0", 16 << 20, 0, (16 << 20,), (1,))}).done(),
        {"0": bytes(64 << 20)}, zipfile.ZIP_DEFLATED))
    add("allocate/safetensors end beyond the file", "load", write_safetensors(
        d / "big.safetensors", {"w": {"dtype": "F32", "shape": [2 ** 29], "data_offsets": [0, 2 ** 31]}}))
    add("allocate/safetensors negative begin", "load", write_safetensors(
        d / "negative.safetensors", {"w": {"dtype": "F32", "shape": [2 ** 29], "data_offsets": [-2 ** 31, 0]}}))
    clip_state = cl.CLIP(**TINY_CLIP).state_dict()
    clip_state["positional_embedding"] = torch.zeros(1, 64).expand(4_000_000, 64)  # one row, 4M times
    torch.save(clip_state, d / "stride0.pt")
    add("allocate/stride-0 positional embedding, torch file", "load", d / "stride0.pt")
    add("allocate/stride-0 tensor, archive", "load", write_archive(
        d / "stride0_jit.pt", Pickle().module({"w": lambda p: p.tensor("0", 4, 0, (4_000_000, 4), (0, 1))}).done(), four))
    # read memory that is not the file's
    add("read/empty storage grown by BUILD, archive", "load", write_archive(
        d / "grow_jit.pt", build_on(lambda p: p.tensor("0", 0, 0, (0,), (1,)),
                                    lambda p: p.raw(P.MARK).storage("0", 0).int(0).ints((1 << 20,)).ints((1,)).raw(P.TUPLE)),
        {"0": b""}))
    add("read/tensor BUILD (set_), torch file", "torch", write_torch_file(
        d / "grow.pt", Pickle().dict({"w": lambda p: p.tensor("0", 4, 0, (4,), (1,)).raw(
            P.MARK).storage("0", 4).int(0).ints((1 << 20,)).ints((1,)).raw(P.TUPLE, P.BUILD)}).done(), four))
    add("read/view beyond its storage, archive", "load", write_archive(
        d / "beyond_jit.pt", Pickle().module({"w": lambda p: p.tensor("0", 4, 2, (4,), (1,))}).done(), four))
    add("read/overlapping view, archive", "load", write_archive(
        d / "overlap_jit.pt", Pickle().module({"w": lambda p: p.tensor("0", 4, 0, (3, 2), (1, 1))}).done(), four))
    head = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}
    add("read/safetensors small negative offset", "load", write_safetensors(d / "header.safetensors", head, floats(4)))
    add("read/safetensors overlapping ranges", "load", write_safetensors(d / "overlap.safetensors", {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, floats(4)))
    add("read/safetensors duplicate keys", "load", write_safetensors(
        d / "duplicate.safetensors", b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                     b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', floats(4)))
    add("read/safetensors shape not matching its bytes", "load", write_safetensors(
        d / "shape.safetensors", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, floats(4)))
    add("read/safetensors unknown dtype", "load", write_safetensors(
        d / "dtype.safetensors", {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, floats(4)))
    # change the loader: BUILD on the allowed rebuild function
    rebuild = lambda p: p.glob("torch._utils", "_rebuild_tensor_v2")
    patch = lambda p: p.dict({"__doc__": lambda q: q.str("patched"), "marker": lambda q: q.int(1)})
    add("change/BUILD on the rebuild function, archive", "load", write_archive(d / "patch_jit.pt", build_on(rebuild, patch)))
    add("change/BUILD on the rebuild function, torch file", "torch", write_torch_file(
        d / "patch.pt", Pickle().dict({"x": lambda p: patch(rebuild(p)).raw(P.BUILD)}).done()))
    add("change/BUILD on a storage type, archive", "load", write_archive(
        d / "patch_type_jit.pt", build_on(lambda p: p.glob("torch", "FloatStorage"), patch)))
    # escape as the wrong exception: each file below made the loader before issue 13 raise the named
    # exception (checked against that version), which train.py and eval.py did not catch
    wrong = {
        "struct.error: 5-byte safetensors": d / "short.safetensors",
        "KeyError: safetensors entry without data_offsets": write_safetensors(
            d / "key.safetensors", {"a": {"dtype": "F32", "shape": [1]}}, floats(1)),
        "TypeError: safetensors offsets are strings": write_safetensors(
            d / "type.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, floats(1)),
        "OverflowError: safetensors range of 2^64 bytes": write_safetensors(
            d / "overflow.safetensors", {"a": {"dtype": "F32", "shape": [2 ** 62], "data_offsets": [-2 ** 64, 0]}}),
        "OSError: safetensors offset before the file": write_safetensors(
            d / "seek.safetensors", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [-10 ** 6, -10 ** 6]}}),
        "RecursionError: safetensors header nested 100000 deep": write_safetensors(
            d / "recursion.safetensors", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "BadZipFile: truncated zip": d / "truncated.pt",
        "NotImplementedError: archive's data.pkl compressed with method 97": d / "method_jit.pt",
        "AttributeError: state dict with integer keys": d / "intkeys.pt",
        "IndexError: a 1-D text projection": d / "index.pt",
        "RuntimeError: a meta tensor among the weights": d / "meta.pt",
        "(was ValueError) zip record offset beyond the file": d / "offset.pt",
        "(was ValueError) record smaller than its storage": write_torch_file(
            d / "small.pt", Pickle().dict({"w": lambda p: p.tensor("0", 1000, 0, (4,), (1,))}).done(), four),
        "(was ValueError) a text file": d / "notes.pt",
        "(was loaded) torch's legacy format": d / "legacy.pt",
    }
    for case, path in wrong.items():
        add("wrong/" + case, "load", path)
    (d / "short.safetensors").write_bytes(b"\x01\x02\x03\x04\x05")
    (d / "notes.pt").write_bytes(b"hello\n")
    torch.save({"w": torch.zeros(1000)}, d / "truncated.pt")
    (d / "truncated.pt").write_bytes((d / "truncated.pt").read_bytes()[:1500] + (d / "truncated.pt").read_bytes()[-200:])
    write_archive(d / "method_jit.pt", Pickle().module({"w": lambda p: p.tensor("0", 4, 0, (4,), (1,))}).done(), four)
    raw = bytearray((d / "method_jit.pt").read_bytes())
    directory = raw.find(b"PK\x01\x02")  # data.pkl's central-directory entry: its method field at +10
    raw[directory + 10: directory + 12] = struct.pack("<H", 97)
    (d / "method_jit.pt").write_bytes(bytes(raw))
    torch.save({1: torch.zeros(1), 2: torch.zeros(1)}, d / "intkeys.pt")
    clip_state = cl.CLIP(**TINY_CLIP).state_dict()
    torch.save({**clip_state, "text_projection": torch.zeros(64)}, d / "index.pt")
    torch.save({**clip_state, "ln_final.weight": torch.zeros(64, device="meta")}, d / "meta.pt")
    torch.save({"w": torch.zeros(4)}, d / "offset.pt")
    raw = bytearray((d / "offset.pt").read_bytes())
    directory = raw.rfind(b"PK\x01\x02")  # the last record's local-header offset at +42
    raw[directory + 42: directory + 46] = struct.pack("<I", len(raw) - 10)
    (d / "offset.pt").write_bytes(bytes(raw))
    with open(d / "legacy.pt", "wb") as f:
        torch.save({"w": torch.zeros(4)}, f, _use_new_zipfile_serialization=False)
    # pickles that would run a command, one per reader
    marker = d / "pwned"
    payload = RunsCommand(marker)
    torch.save({"w": payload}, d / "evil.pt")
    write_archive(d / "evil_jit.pt", pickle.dumps(payload, protocol=2))
    (d / "evil_legacy.pt").write_bytes(pickle.dumps(payload, protocol=2))
    for name in ("evil.pt", "evil_jit.pt", "evil_legacy.pt"):
        add(f"command/{name}", "load", d / name)
    return files


CHILD = r"""
import json, os, sys, time, types
import torch, torch._utils
import clip_loader as cl

def snapshot():
    # every attribute (name -> identity of its value) of clip_loader's classes and functions
    out = {name: {k: id(v) for k, v in vars(obj).items()} for name, obj in vars(cl).items()
           if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", "") == "clip_loader"}
    out["torch._utils._rebuild_tensor_v2"] = {k: id(v) for k, v in vars(torch._utils._rebuild_tensor_v2).items()}
    return out

def memory(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

readers = {"load": lambda p: cl.load(p, verify=False), "torch": cl.safe_torch_load}
warm_up = sys.argv[2]  # an honest file: torch.load's one-time set-up is not counted against the first case
torch.save({"w": torch.zeros(4)}, warm_up)
cl.safe_torch_load(warm_up)
results = {}
for case, (reader, path) in json.loads(sys.argv[1]).items():
    before = snapshot()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    rss, start = memory("VmRSS:"), time.perf_counter()
    try:
        readers[reader](path)
        error = None
    except BaseException as e:
        error = {"type": type(e).__name__, "is_checkpoint_error": isinstance(e, cl.CheckpointError), "message": str(e)}
    results[case] = {"error": error, "seconds": time.perf_counter() - start,
                     "peak_rise_mib": memory("VmHWM:") - rss, "changed": snapshot() != before}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every attack file loaded in one child process: {case: result}, and the folder."""
    folder = tmp_path_factory.mktemp("hostile")
    files = attack_files(folder)
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(files), str(folder / "honest.pt")], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, f"the child crashed (status {run.returncode}): {run.stderr[-2000:]}"
    results = json.loads(run.stdout.strip().splitlines()[-1])
    return {case: {**results[case], "path": files[case][1]} for case in files}, folder


def assert_refused(result, needle=None, max_mib=16.0, max_seconds=5.0):
    error = result["error"]
    assert error is not None, "loaded without error"
    assert error["is_checkpoint_error"], f"{error['type']} escaped: {error['message'][:300]}"
    message = error["message"]
    assert result["path"] in message and "\n" not in message and len(message) < 1000, message
    if needle:
        assert needle in message, message
    assert result["seconds"] < max_seconds, result
    assert result["peak_rise_mib"] < max_mib, result
    assert not result["changed"], "the load changed a function or class of the loader"


def cases(refusals, prefix):
    found = {case: result for case, result in refusals[0].items() if case.startswith(prefix)}
    assert found
    return found


def test_crash_deep_tuple_key_is_refused(refusals):
    for case, result in cases(refusals, "crash/").items():
        assert_refused(result, "nested more than")


def test_hang_shared_and_cyclic_structures_are_refused(refusals):
    results = cases(refusals, "hang/")
    for case, result in results.items():
        assert_refused(result)
    assert "expand to more than" in results["hang/shared module tree"]["error"]["message"]
    assert "expand to more than" in results["hang/shared-list persistent id, archive"]["error"]["message"]
    assert "(a cycle?)" in results["hang/cyclic module"]["error"]["message"]
    assert "nested more than 100" in results["hang/5000 nested lists"]["error"]["message"]


def test_allocation_bombs_are_refused(refusals):
    results = cases(refusals, "allocate/")
    for case, result in results.items():
        assert_refused(result)  # each file's honest need: 32 MiB to 2 GiB
    assert "memo index 134217728" in results["allocate/memo index 2^27, archive"]["error"]["message"]
    assert "compressed (method 12)" in results["allocate/bzip2 record, archive"]["error"]["message"]
    assert "compressed (method 8)" in results["allocate/deflate record, torch file"]["error"]["message"]
    assert "overlap" in results["allocate/stride-0 positional embedding, torch file"]["error"]["message"]


def test_views_outside_the_file_are_refused(refusals):
    results = cases(refusals, "read/")
    for case, result in results.items():
        assert_refused(result)
    assert "BUILD" in results["read/empty storage grown by BUILD, archive"]["error"]["message"]
    assert "reaches element 6 of a storage of 4" in results["read/view beyond its storage, archive"]["error"]["message"]
    assert "names a tensor twice" in results["read/safetensors duplicate keys"]["error"]["message"]
    assert "overlap" in results["read/safetensors overlapping ranges"]["error"]["message"]


def test_build_cannot_change_the_loader(refusals):
    for case, result in cases(refusals, "change/").items():
        assert_refused(result, "BUILD")


def test_no_wrong_exception_escapes(refusals):
    results = cases(refusals, "wrong/")
    for case, result in results.items():
        assert_refused(result)
    assert "legacy" in results["wrong/(was loaded) torch's legacy format"]["error"]["message"]


def test_command_pickles_still_do_not_run(refusals):
    for case, result in cases(refusals, "command/").items():
        assert_refused(result, "system")
    assert not (refusals[1] / "pwned").exists()


def test_the_reader_alone_leaves_nothing_changed(tmp_path, monkeypatch):
    """Without the opcode scan, the archive reader itself refuses BUILD on what it hands out, and
    a refused file leaves its classes and functions as they were."""
    monkeypatch.setattr(cl, "scan_pickle", lambda *args, **kwargs: None)
    rebuild = lambda p: p.glob("torch._utils", "_rebuild_tensor_v2")
    patch = lambda p: p.dict({"marker": lambda q: q.int(1)})
    targets = {"rebuild function": rebuild, "storage type": lambda p: p.glob("torch", "FloatStorage"),
               "OrderedDict": lambda p: p.glob("collections", "OrderedDict"),
               "TorchScript class": lambda p: p.glob("__torch__", "M"),
               "tensor": lambda p: p.tensor("0", 4, 0, (4,), (1,))}
    before = {name: dict(vars(obj)) for name, obj in vars(cl).items() if isinstance(obj, type)}
    for what, target in targets.items():
        path = write_archive(tmp_path / "patch.pt", build_on(target, patch), {"0": floats(4)})
        with pytest.raises(cl.CheckpointError):
            cl.read_state_dict(path)
    assert {name: dict(vars(obj)) for name, obj in vars(cl).items() if isinstance(obj, type)} == before


def test_walk_visits_a_shared_module_once():
    """The module walk itself, on a 64-level tree whose two children are one object: it returns at
    once, with the tensor under its first name."""
    view = cl._TensorView(cl._Storage(torch.zeros(4)), 0, (4,), (1,))
    node = cl._ScriptObject()
    node.__setstate__({"w": view})
    for _ in range(64):
        parent = cl._ScriptObject()
        parent.__setstate__({"a": node, "b": node})
        node = parent
    found = cl._collect_tensors(node)
    assert len(found) == 1 and list(found.values()) == [view]


def test_scripts_exit_with_one_line(refusals, tmp_path):
    """eval.py --ckpt and train.py --resume on the file that crashed them (run side by side): exit
    status 1 and one line naming the file, no traceback, no signal."""
    path = refusals[0]["crash/deep tuple key, torch file"]["path"]
    (tmp_path / "last.pt").write_bytes(Path(path).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"train": {}, "model": {}}))  # a run folder, as train.py's
    commands = {"eval.py": (["--ckpt", path], path), "train.py": (["--resume", "--out", str(tmp_path)],
                                                                  str(tmp_path / "last.pt"))}
    runs = {script: subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for script, (args, _) in commands.items()}
    for script, run in runs.items():
        _, stderr = run.communicate(timeout=120)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert run.returncode == 1, (script, run.returncode, stderr[-1000:])
        assert len(lines) == 1 and "Traceback" not in stderr, (script, stderr)
        assert lines[0].startswith(f"{commands[script][1]}: cannot be read: ") and "nested more than" in lines[0]


def test_checkpoint_loader_of_the_scripts_gives_one_line(refusals):
    """The loader eval.py --ckpt, train.py --resume, train.py's best.pt and the predict API share, on every
    torch-file attack: a CheckpointError (which the scripts turn into an exit) with one line naming the file."""
    import eval as evaluation
    for case, result in refusals[0].items():
        if result["path"].endswith(".pt") and "archive" not in case:
            with pytest.raises(cl.CheckpointError) as error:
                evaluation.load_checkpoint(result["path"])
            message = str(error.value)
            assert message.startswith(f"{result['path']}: ") and "\n" not in message, (case, message)
