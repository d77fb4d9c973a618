"""The README cannot rot: every `python ...` and `torchrun ...` command in its code blocks is parsed
by the script it names, with exactly the README's arguments (argument parsing only, no training).

How: one subprocess runs each command's script with argparse.ArgumentParser.parse_args wrapped so that
a successful parse stops the script (SystemExit with a marker status) before it does any work; a
rejected argument stops it with argparse's own status 2 and message. A script that never reaches its
parser is reported too. One subprocess for all commands keeps torch imported once.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def readme_commands():
    """(line number, command text, argv) of every python/torchrun command inside ``` blocks."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate((ROOT / "README.md").read_text(encoding="utf-8").splitlines(), 1):
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
            argv = shlex.split(part)
            if argv and argv[0] in ("python", "python3", "torchrun") and argv[1:2] != ["-m"]:
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
    commands = readme_commands()
    scripts = [script_and_args(argv)[0] for _, _, argv in commands]
    assert {"train.py", "eval.py"} <= set(scripts), scripts
    assert any(argv[0] == "torchrun" for _, _, argv in commands), "README shows no torchrun command"
    missing = [f"README:{line}: {script}" for (line, _, _), script in zip(commands, scripts)
               if not (ROOT / script).is_file()]
    assert not missing, missing

    todo = [script_and_args(argv) for _, _, argv in commands]
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(todo), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = json.loads(result.stdout.strip().splitlines()[-1])
    failures = [f"README:{line}: `{text}` -> {status}"
                for (line, text, _), status in zip(commands, statuses) if status != "ok"]
    assert not failures, "\n".join(failures)
