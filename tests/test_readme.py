"""The READMEs cannot rot: every `python ...` and `torchrun ...` command in the code blocks of README.md and
bench/README.md is parsed by the script it names, with exactly the README's arguments (argument parsing
only, no training); every relative link and anchor resolves; every test the READMEs name exists.

How: one subprocess runs each command's script with argparse.ArgumentParser.parse_args wrapped so that
a successful parse stops the script (SystemExit with a marker status) before it does any work; a
rejected argument stops it with argparse's own status 2 and message. A script that never reaches its
parser is reported too. One subprocess for all commands keeps torch imported once. A script without an
argument parser is not run: its commands must pass no arguments.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "bench/README.md")
TORCHRUN_FLAGS = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path"}  # take no value

RUNNER = r"""
import argparse, contextlib, io, json, os, runpy, sys
PARSED = 99
_parse = argparse.ArgumentParser.parse_args
def parse_args(self, *a, **k):
    _parse(self, *a, **k)
    sys.exit(PARSED)
argparse.ArgumentParser.parse_args = parse_args
sys.path.insert(0, '.')
results = []
for rest in json.loads(sys.stdin.read()):
    sys.argv = list(rest)
    err = io.StringIO()
    saved_path = list(sys.path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))   # as `python script.py` does
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(rest[0], run_name='__main__')
        status = 'finished without parsing arguments'
    except SystemExit as stop:
        status = 'ok' if stop.code == PARSED else f'exit {stop.code}: ' + err.getvalue()[-800:]
    except BaseException as e:
        status = f'{type(e).__name__}: {e}'
    sys.path[:] = saved_path
    results.append(status)
print(json.dumps(results))
"""


def readme_commands(readme):
    """(line number, command text, argv) of every python/torchrun command inside ``` blocks of `readme`
    (a path relative to the repository root)."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate((ROOT / readme).read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        text = line.split(" #")[0].rstrip()
        pending += " " + text.rstrip("\\").strip()
        if text.endswith("\\"):
            continue
        command, pending = pending.strip(), ""
        for part in re.split(r"\s*(?:&&|;|\|)\s*", command):   # `cd x && python y.py` chains
            if part.split()[:1] not in (["python"], ["python3"], ["torchrun"]):
                continue   # Python code in a ```python block is not a command (and need not shlex-split)
            argv = shlex.split(part)
            if argv[1:2] != ["-m"]:
                commands.append((start, part, argv))
    return commands


def script_and_args(argv):
    """Strip the interpreter (and torchrun's own options) down to [script.py, args...]."""
    rest = argv[1:]
    if argv[0] == "torchrun":
        while rest and rest[0].startswith("-"):
            option = rest.pop(0)
            if "=" not in option and option not in TORCHRUN_FLAGS and rest:
                rest.pop(0)   # the option's value, e.g. --nproc_per_node 2
    return rest


def test_every_readme_command_parses():
    commands = [(readme, line, text, argv) for readme in READMES for line, text, argv in readme_commands(readme)]
    scripts = {readme: [script_and_args(argv)[0] for r, _, _, argv in commands if r == readme] for readme in READMES}
    assert {"train.py", "eval.py"} <= set(scripts["README.md"]), scripts["README.md"]
    assert any(r == "README.md" and argv[0] == "torchrun" for r, _, _, argv in commands), \
        "README shows no torchrun command"
    benches = {f"bench/{p.name}" for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text(encoding="utf-8")}
    assert benches <= set(scripts["bench/README.md"]), f"bench/README.md shows no command for {benches - set(scripts['bench/README.md'])}"
    missing = [f"{readme}:{line}: {script_and_args(argv)[0]}" for readme, line, _, argv in commands
               if not (ROOT / script_and_args(argv)[0]).is_file()]
    assert not missing, missing

    # a script without an argument parser would run in full: its commands must pass no arguments
    to_parse, failures = [], []
    for readme, line, text, argv in commands:
        rest = script_and_args(argv)
        if "parse_args" in (ROOT / rest[0]).read_text(encoding="utf-8"):
            to_parse.append((readme, line, text, rest))
        elif rest[1:]:
            failures.append(f"{readme}:{line}: `{text}` -> {rest[0]} takes no arguments")
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps([rest for *_, rest in to_parse]),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = json.loads(result.stdout.strip().splitlines()[-1])
    failures += [f"{readme}:{line}: `{text}` -> {status}"
                 for (readme, line, text, _), status in zip(to_parse, statuses) if status != "ok"]
    assert not failures, "\n".join(failures)


def anchors(path):
    """GitHub's anchors for the headings of a Markdown file: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ..."""
    found, seen, in_block = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        if in_block or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("readme", READMES)
def test_readme_links_and_anchors_resolve(readme):
    path = ROOT / readme
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists() or ROOT not in linked.parents:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.relative_to(ROOT)}")
    assert not broken, broken


def test_readme_anchors_cited_by_the_code_exist():
    """The code cites the READMEs by anchor ("README.md#loss", "bench/README.md#ablation"), from the
    repository root; each must be a heading there."""
    known = {readme: anchors(ROOT / readme) for readme in READMES}
    broken = []
    for source in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("bench/*.sh"), *ROOT.glob("tests/*.py")]:
        for readme, anchor in re.findall(r"((?:bench/)?README\.md)#([a-z0-9_-]+)", source.read_text(encoding="utf-8")):
            if anchor not in known[readme]:
                broken.append(f"{source.relative_to(ROOT)}: {readme}#{anchor}")
    assert not broken, broken


@pytest.mark.parametrize("readme", READMES)
def test_tests_the_readme_names_exist(readme):
    names = set(re.findall(r"`(test_\w+(?:\.py)?\*?)`", (ROOT / readme).read_text(encoding="utf-8")))
    defined = set()
    for source in (ROOT / "tests").glob("test_*.py"):
        defined.add(source.name)
        defined |= set(re.findall(r"^def (test_\w+)", source.read_text(encoding="utf-8"), flags=re.M))
    missing = [name for name in names if not any(d == name or (name.endswith("*") and d.startswith(name[:-1]))
                                                 for d in defined)]
    assert not missing, missing
