"""Every `python ...` command in the shell blocks of README.md and docs/*.md names a script or
module of the repository, and only flags that it defines.

Flags are read from the source first (absl `DEFINE_*` calls and argparse `add_argument` calls in
the target, in the functions of tfx or bench modules that it calls, and in the functions those
call); a flag not found there is looked up in the target's own `--helpfull` / `--help` output,
run once per target. `--config.KEY=VALUE` must name a key of the config schema, `--config FILE`
a config file that loads, and `--checkpoint average:N` at most the `keep_checkpoints` of the
run's config.
"""
from __future__ import annotations

import ast
import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tfx.core import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_LANGUAGES = ("sh", "bash", "shell", "console", "")
# Commands whose own flags are not ours to check; a python command wrapped by one is not checked.
NOT_OURS = {"pip", "pip3", "gcloud", "gsutil", "sacrebleu", "nvidia-smi", "git", "tensorboard"}
# Commands that run the command after their own options.
LAUNCHERS = {"srun", "mpirun", "timeout", "nohup", "time", "env", "exec"}
# Flags every absl program has.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok", "logtostderr",
              "alsologtostderr", "log_dir", "verbosity", "v", "stderrthreshold", "only_check_args"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]{2,}")  # KEY, VALUE, VARIANT, TOPOLOGY ...


def docs() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


@dataclass(frozen=True)
class Command:
    doc: str  # the file, relative to the repository
    line: int  # of the command's first line in it
    words: tuple[str, ...]  # from `python` on

    def __str__(self):
        return f"{self.doc}:{self.line}: {' '.join(self.words)}"


def shell_blocks(text: str):
    """(line number of the block's first line, block text) of each fenced shell block; an
    unlabelled block counts when a line of it starts like a shell command."""
    for match in re.finditer(r"^```([\w+-]*)[^\n]*\n(.*?)^```", text, re.M | re.S):
        language, body = match.group(1).lower(), match.group(2)
        if language not in SHELL_LANGUAGES:
            continue
        if not language and not re.search(r"^\s*(\$ )?(\w+=\S+ )*(python3?|pip|bash) ", body, re.M):
            continue
        yield text.count("\n", 0, match.start(2)) + 1, body


def logical_lines(body: str, first: int):
    """(line number, text) of each command line, `\\` continuations joined, a console's `$ `
    prompt dropped."""
    start, parts = None, []
    for number, line in enumerate(body.splitlines(), start=first):
        if start is None:
            start = number
            line = re.sub(r"^\s*\$ ", "", line)
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(parts)


def segments(line: str) -> list[list[str]]:
    """The simple commands of a line: its words split at `|`, `||`, `&&` and `;`, comments
    dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split, lexer.commenters = True, "#"
    result = [[]]
    for word in lexer:
        if word and set(word) <= set("|&;"):
            result.append([])
        else:
            result[-1].append(word)
    return [words for words in result if words]


def python_words(words: list[str]) -> list[str] | None:
    """The words from `python` on, if this simple command runs python; else None."""
    words = [w for w in words if w not in ("[", "]")]
    index = 0
    while index < len(words) and re.fullmatch(r"\w+=.*", words[index]):
        index += 1  # environment assignments.
    if index == len(words) or os.path.basename(words[index]) in NOT_OURS:
        return None
    if os.path.basename(words[index]) in LAUNCHERS:
        index = next((i for i in range(index, len(words)) if _is_python(words[i])), len(words))
    if index < len(words) and _is_python(words[index]):
        return words[index:]
    return None


def _is_python(word: str) -> bool:
    return re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(word)) is not None


def commands() -> list[Command]:
    found = []
    for path in docs():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for first, body in shell_blocks(text):
            for number, line in logical_lines(body, first):
                for python in python_commands(line):
                    found.append(Command(os.path.relpath(path, ROOT), number, tuple(python)))
    return found


def python_commands(line: str) -> list[list[str]]:
    """The python commands of a line, those that `gcloud ... ssh --command=...` runs included."""
    found = []
    for words in segments(line):
        if (python := python_words(words)) is not None:
            found.append(python)
        elif os.path.basename(words[0]) == "gcloud":
            for index, word in enumerate(words):
                if word.startswith("--command="):
                    found.extend(python_commands(word[len("--command="):]))
                elif word == "--command" and index + 1 < len(words):
                    found.extend(python_commands(words[index + 1]))
    return found


# --- What a target is, and the flags it defines --------------------------------------------

def target(words: tuple[str, ...]) -> tuple[str, str | None, list[str]]:
    """(what the command runs, its source file in the repository or None, its arguments)."""
    if len(words) < 2:
        return "python", None, []
    if words[1] == "-m":
        module = words[2]
        base = os.path.join(ROOT, *module.split("."))
        for path in (base + ".py", os.path.join(base, "__main__.py")):
            if os.path.isfile(path):
                return module, path, list(words[3:])
        return module, None, list(words[3:])
    if words[1].startswith("-"):
        return words[1], None, []  # python -c ..., python -V: nothing of ours.
    return words[1], os.path.join(ROOT, words[1]), list(words[2:])


def is_ours(name: str) -> bool:
    return name.startswith("tfx") or name.endswith(".py")


@functools.cache
def _tree(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _module_file(module: str, near: str) -> str | None:
    """The file of `module` (tfx.a.b in the repository, or a module beside `near`, as a script
    sees its own directory)."""
    candidates = [os.path.join(ROOT, *module.split(".")), os.path.join(os.path.dirname(near), module)]
    for base in candidates:
        for path in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(path):
                return path
    return None


def _imports(path: str) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, attribute or None) for the imports of a file that it can call."""
    names = {}
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (alias.name, None)
    return names


def _flag_names(call: ast.Call) -> list[str]:
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    strings = [arg.value for arg in call.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    if name.startswith("DEFINE_"):
        keyword = [k.value.value for k in call.keywords
                   if k.arg == "name" and isinstance(k.value, ast.Constant)]
        return (strings[:1] or keyword)[:1]
    if name == "add_argument":
        return [s[2:] for s in strings if s.startswith("--")]
    return []


def _callees(node: ast.AST, path: str) -> list[tuple[str, str]]:
    """(file, function name) of the functions of tfx or of a script's own modules that `node`
    calls."""
    names, result = _imports(path), []
    local = {n.name for n in _tree(path).body if isinstance(n, ast.FunctionDef)}
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        func = call.func
        if isinstance(func, ast.Name) and func.id in local:
            result.append((path, func.id))
        elif isinstance(func, ast.Name) and func.id in names and names[func.id][1]:
            module, attribute = names[func.id]
            if file := _module_file(module, path):
                result.append((file, attribute))
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
            module, attribute = names[func.value.id]
            if file := _module_file(f"{module}.{attribute}" if attribute else module, path):
                result.append((file, func.attr))
    return result


def _is_ours(path: str) -> bool:
    return os.path.commonpath([ROOT, path]) == ROOT and "/tests/" not in path


def static_flags(path: str) -> tuple[set[str], bool]:
    """The flags defined in `path` and in the functions it calls, followed through the
    repository's modules; and whether the program parses with absl."""
    flags, seen = set(), set()
    todo = [(path, None)]
    while todo:
        file, function = todo.pop()
        if (file, function) in seen or not _is_ours(file):
            continue
        seen.add((file, function))
        if function is None:
            node = _tree(file)
        else:
            node = next((n for n in _tree(file).body
                         if isinstance(n, ast.FunctionDef) and n.name == function), None)
            if node is None:
                continue
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            flags.update(_flag_names(call))
        todo.extend(_callees(node, file))
    return flags, any(_uses_absl(file) for file, _ in seen)


@functools.cache
def _uses_absl(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        return "absl" in f.read()


@functools.cache
def help_flags(words: tuple[str, ...]) -> frozenset[str]:
    """The flags the program's own help lists (`--helpfull` for absl, `--help` for argparse)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outputs = []
    for option in ("--helpfull", "--help"):
        run = subprocess.run([sys.executable, *words, option], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        outputs.append(run.stdout + run.stderr)
        if run.returncode == 0:
            break
    return frozenset(re.findall(r"--(?:\[no\])?([A-Za-z][\w.-]*)", "\n".join(outputs)))


# --- Config files, keys and checkpoints ----------------------------------------------------

@functools.cache
def _config(spec: str):
    return config_lib.load(os.path.join(ROOT, spec))


def _schema_has(key: str) -> bool:
    node = config_lib.default_config()
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node[part]
    return True


def options(arguments: list[str]) -> list[tuple[str, str | None]]:
    """(flag, value or None) of each `--flag[=value]` or `--flag value` in `arguments`."""
    result = []
    for index, word in enumerate(arguments):
        if not word.startswith("--") or word == "--":
            continue
        name, equals, value = word[2:].partition("=")
        if not equals and index + 1 < len(arguments) and not arguments[index + 1].startswith("-"):
            value = arguments[index + 1]
        result.append((name, value if (equals or value) else None))
    return result


@functools.cache
def run_configs() -> dict[str, tuple[str, int | None]]:
    """workdir -> (config spec, keep_checkpoints override) of each train.py command in the docs."""
    runs = {}
    for command in commands():
        _, path, arguments = target(command.words)
        if path != os.path.join(ROOT, "train.py"):
            continue
        given = dict(options(arguments))
        keep = given.get("config.keep_checkpoints")
        if given.get("config") and given.get("workdir"):
            runs[given["workdir"]] = (given["config"].split()[0], int(keep) if keep else None)
    return runs


def problems(command: Command) -> list[str]:
    """What is wrong with one command: a missing target, unknown flags, bad config keys."""
    name, path, arguments = target(command.words)
    if name.startswith("-") or name == "python":
        return []  # python -c CODE, python -V: nothing of ours to check.
    if not is_ours(name):
        return [] if importlib.util.find_spec(name.split(".")[0]) else [f"no module {name} is installed"]
    if path is None or not os.path.isfile(path):
        return [f"{name} is not a script or module of the repository"]
    defined, uses_absl = static_flags(path)
    given = options(arguments)
    found = []
    known = set(defined) | (ABSL_FLAGS if uses_absl else {"help"})
    for flag, _ in given:
        if not _defines(known, flag, uses_absl):
            known |= help_flags((path,) if command.words[1] != "-m" else ("-m", name))
            uses_absl = uses_absl or "helpfull" in known
        if not _defines(known, flag, uses_absl):
            found.append(f"--{flag} is not a flag of {name}")
        elif flag.startswith("config.") and not PLACEHOLDER.search(flag) and not _schema_has(flag[7:]):
            found.append(f"--{flag}: the config has no key {flag[7:]!r}")
    found.extend(_config_problems(dict(given)))
    return found


def _defines(known: set[str], flag: str, uses_absl: bool) -> bool:
    if flag.startswith("config."):  # an override of a key of --config.
        return "config" in known
    return flag in known or (uses_absl and flag.startswith("no") and flag[2:] in known)


def _config_problems(given: dict[str, str | None]) -> list[str]:
    spec = given.get("config")
    # A variant that names a run (configs/opus_mt.py:runs/...) loads its config.json, which an
    # earlier command of the page writes; tests/opus_mt_test.py runs those pages' commands.
    if spec and spec.partition(":")[2].startswith("runs/"):
        return []
    if spec and spec.startswith("configs/") and not PLACEHOLDER.search(spec):
        try:
            _config(spec)
        except (ValueError, FileNotFoundError) as error:
            return [f"--config {spec}: {error}"]
    checkpoint = given.get("checkpoint") or ""
    if match := re.fullmatch(r"average:(\d+)", checkpoint):
        keep = given.get("config.keep_checkpoints")
        if keep is None and spec and spec.startswith("configs/") and not PLACEHOLDER.search(spec):
            keep = _config(spec).keep_checkpoints
        elif keep is None and given.get("workdir") in run_configs():
            run_spec, keep = run_configs()[given["workdir"]]
            keep = keep or _config(run_spec).keep_checkpoints
        if keep is not None and int(match.group(1)) > int(keep):
            return [f"--checkpoint {checkpoint}: the run keeps {keep} checkpoints"]
    return []


# --- The tests ------------------------------------------------------------------------------

def test_the_parser_finds_commands_joined_piped_and_prefixed():
    body = ("XLA_FLAGS=--x=8 python bench/memory.py --config C \\\n"
            "    --mesh data:2  # a comment --not-a-flag\n"
            "echo hi | python translate.py --workdir W && pip install -e .\n"
            "srun --nodes=4 python train.py --workdir W2\n"
            "gcloud compute tpus tpu-vm ssh T --command 'python train.py --bad'\n")
    found = [words for _, line in logical_lines(body, 1) for words in python_commands(line)]
    assert found == [
        ["python", "bench/memory.py", "--config", "C", "--mesh", "data:2"],
        ["python", "translate.py", "--workdir", "W"],
        ["python", "train.py", "--workdir", "W2"],
        ["python", "train.py", "--bad"],
    ]
    assert options(["--config", "c.py", "--config.seed=1", "--force", "--top_k", "5"]) == [
        ("config", "c.py"), ("config.seed", "1"), ("force", None), ("top_k", "5")]


def test_flags_are_read_from_the_source():
    assert {"config", "workdir", "checkpoint", "hyp", "ref"} <= static_flags(os.path.join(ROOT, "eval.py"))[0]
    assert {"config", "mesh", "steps"} <= static_flags(os.path.join(ROOT, "bench", "train.py"))[0]


def test_a_wrong_flag_key_or_average_is_found():
    eval_flags, uses_absl = static_flags(os.path.join(ROOT, "eval.py"))
    assert uses_absl and _defines(eval_flags, "checkpoint", True) and not _defines(eval_flags, "bogus", True)
    wrong = Command("x.md", 1, ("python", "eval.py", "--config", "configs/wmt_base.py:base",
                                "--checkpoint", "average:5", "--config.model.no_such_key=1"))
    assert problems(wrong) == ["--config.model.no_such_key: the config has no key 'model.no_such_key'",
                               "--checkpoint average:5: the run keeps 3 checkpoints"]
    missing = Command("x.md", 1, ("python", "-m", "tfx.no_such_tool", "--workdir", "W"))
    assert problems(missing) == ["tfx.no_such_tool is not a script or module of the repository"]


def test_the_docs_have_commands():
    found = commands()
    assert len(found) >= 40, [str(c) for c in found]
    assert {c.doc for c in found} >= {"README.md", "docs/training.md", "docs/compression.md"}


@pytest.mark.parametrize("command", commands(), ids=lambda c: f"{c.doc}:{c.line}")
def test_command_names_an_existing_program_and_its_flags(command):
    assert not problems(command), f"{command}\n  " + "\n  ".join(problems(command))
