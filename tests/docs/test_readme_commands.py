"""The commands, links and test names of README.md and docs/*.md work with the current code.

Commands (lines of ``bash`` blocks, and the README's inline ``python ...`` / ``bash ...`` spans) go
through the real argument parsers: Detectron2's ``default_argument_parser`` for ``train_net.py``,
and for ``demo.py``, the tools and ``python -m deformable_detr.benchmark.*`` their own ``main``,
stopped once it has parsed its arguments. A config file a command names must exist, and its
``KEY VALUE`` overrides must merge into the config the project builds, so a renamed key or a value
of the wrong type fails here. Shell scripts are syntax-checked and their arguments checked against
what the script takes. Relative links and pictures must name existing files (and a ``#fragment`` a
heading of the target), and every test file or test a page names must exist.

The self-tests at the end feed each check a synthetic mistake, so that none of them can pass by
checking nothing.
"""

import argparse
import ast
import contextlib
import fnmatch
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from unittest import mock

import pytest
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from helpers import REPO_ROOT as ROOT

from deformable_detr import add_deformable_detr_config

README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
TOOLS_DIR = "projects/DeformableDETR/tools/"
VARIANTS = ("r50", "r50_box_refine", "r50_two_stage", "r50_single_scale", "r50_single_scale_dc5")
# The stand-ins of the pages: each one names something the reader supplies.
PLACEHOLDERS = {
    "variant": VARIANTS,
    "downloaded-checkpoint": ("r50_deformable_detr-checkpoint",),
}
# Programs whose arguments are their own business (formatters, pip).
KNOWN_TOOLS = {"black", "isort", "clang-format", "pip"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
# Pictures made apart from the code and committed separately: until they are, a link to them is an
# expected failure, not a silent skip.
PENDING_PICTURES = {
    "docs/quickstart_detections.png": "made by a quickstart run, committed separately",
    "docs/sampling.png": "made by demo.py --show-sampling, committed separately",
}
# demo.py's --show-sampling is being added separately; until it is, commands using it fail to parse.
PENDING_DEMO_FLAG = "--show-sampling"


class CommandError(Exception):
    """A command of the pages that does not work with the current code; the message says why."""


def _rel(path):
    return os.path.relpath(path, ROOT)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------------------------------
# Reading the pages


def code_blocks(text):
    """``(language, first line number, body)`` of every fenced block, in order."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        start, body = i + 2, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append((match.group(2), start, "\n".join(body)))
        i += 1
    return blocks


def prose(text):
    """The text outside fenced blocks, with blocks blanked so that line numbers stay."""
    out, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*```", line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return out


def block_commands(body, first_line):
    """``(line number, command)`` of a shell block: continuations joined, comments skipped."""
    commands, pending, pending_line = [], "", None
    for offset, line in enumerate(body.splitlines()):
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            pending_line = first_line + offset
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        commands.append((pending_line, pending + stripped))
        pending = ""
    if pending:
        commands.append((pending_line, pending.strip()))
    return commands


def _looks_like_command(line):
    return bool(re.match(r"^(python3?\s|bash\s|\.venv/bin/\S+\s)", line.strip() + " "))


def spans(text):
    """``(line number, content)`` of the inline code spans outside fenced blocks (a span may run
    over a line break)."""
    body = "\n".join(prose(text))
    return [
        (body.count("\n", 0, match.start()) + 1, match.group(1))
        for match in re.finditer(r"`([^`]+)`", body)
    ]


def inline_commands(text):
    """``(line number, command)`` of inline code spans that are commands."""
    return [
        (number, " ".join(span.split()))
        for number, span in spans(text)
        if _looks_like_command(span)
    ]


def page_commands(path):
    """Every command a page gives: its shell blocks, and for the README its inline commands."""
    text = _read(path)
    commands = []
    for language, first_line, body in code_blocks(text):
        if language in ("bash", "sh", "shell"):
            commands.extend(block_commands(body, first_line))
    if path == README:
        commands.extend(inline_commands(text))
    return sorted(commands)


def untagged_command_blocks(text):
    """Line numbers of blocks without a shell language whose first line is a command: their
    commands would not be checked."""
    found = []
    for language, first_line, body in code_blocks(text):
        lines = [line for line in body.splitlines() if line.strip()]
        if language not in ("bash", "sh", "shell") and lines and _looks_like_command(lines[0]):
            if language != "python":
                found.append(first_line)
    return found


# ------------------------------------------------------------------------------------------------
# Commands


def expand_placeholders(command):
    """The commands a line with ``<name>`` stand-ins stands for (every value of each)."""
    names = re.findall(r"<([^<>]+)>", command)
    unknown = sorted(set(names) - set(PLACEHOLDERS))
    if unknown:
        raise CommandError(f"unknown placeholder(s) {unknown}: add them to PLACEHOLDERS")
    commands = [command]
    for name in dict.fromkeys(names):
        commands = [c.replace(f"<{name}>", v) for c in commands for v in PLACEHOLDERS[name]]
    return commands


def split_command(command):
    """``(environment, argv)`` of one simple command; pipes, lists and redirections are refused."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError as e:
        raise CommandError(f"not a shell command: {e}") from e
    operators = [t for t in tokens if t and set(t) <= set(";&|<>")]
    if operators:
        raise CommandError(f"one simple command per line, found {operators}")
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if not tokens:
        raise CommandError("no program")
    return env, tokens


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_with(main, argv, what):
    """The arguments ``main(argv)`` parses, stopped before it does anything with them.

    Returns None for ``--help`` (argparse exits with status 0).
    """
    original = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                main(list(argv))
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as e:
            if e.code in (0, None):
                return None
            raise CommandError(f"{what} refuses {argv}: {err.getvalue().strip()}") from None
    raise CommandError(f"{what} returned without parsing its arguments")


def check_config(config_file, opts):
    """The config file exists and the overrides merge into the project's config."""
    if config_file is None:
        return
    path = os.path.join(ROOT, config_file)
    if not os.path.isfile(path):
        raise CommandError(f"config file {config_file!r} does not exist")
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(path)
    opts = list(opts or [])
    if len(opts) % 2:
        raise CommandError(f"overrides must be KEY VALUE pairs: {opts}")
    # Merged one by one, not through load_config, which would also register the datasets of
    # DATASETS.REGISTER_COCO and so need their files.
    for key, value in zip(opts[::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except Exception as e:
            raise CommandError(f"override {key} {value!r}: {e}") from e


_MODULES = {}


def _module_from_path(relative):
    if relative not in _MODULES:
        path = os.path.join(ROOT, relative)
        if not os.path.isfile(path):
            raise CommandError(f"{relative} does not exist")
        name = "ddetr_docs_" + re.sub(r"\W", "_", relative)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[relative] = module
    return _MODULES[relative]


def check_train_net(argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = default_argument_parser().parse_args(list(argv))
    except SystemExit as e:
        if e.code in (0, None):
            return
        raise CommandError(f"train_net.py refuses {argv}: {err.getvalue().strip()}") from None
    check_config(args.config_file or None, args.opts)


def check_pytest(argv):
    takes_value = {"-k", "-m", "-p", "-c", "--rootdir", "--basetemp"}
    args = iter(argv)
    for arg in args:
        if arg in takes_value:
            next(args, None)
        elif not arg.startswith("-"):
            check_test_reference(arg)


def check_python(argv):
    if not argv:
        raise CommandError("python without a script")
    if argv[0] == "-m":
        if len(argv) < 2:
            raise CommandError("python -m without a module")
        module, rest = argv[1], argv[2:]
        if module == "pytest":
            return check_pytest(rest)
        if module.startswith("deformable_detr.benchmark."):
            try:
                main = importlib.import_module(module).main
            except ImportError as e:
                raise CommandError(f"python -m {module}: {e}") from e
            args = parse_with(main, rest, f"python -m {module}")
            if args is not None:
                check_config(getattr(args, "config_file", None), getattr(args, "opts", None))
            return
        raise CommandError(f"python -m {module}: not a module these pages may use")
    script, rest = argv[0], argv[1:]
    if script == "train_net.py":
        return check_train_net(rest)
    if script == "demo.py" or (script.startswith(TOOLS_DIR) and script.endswith(".py")):
        args = parse_with(_module_from_path(script).main, rest, script)
        if args is not None:
            check_config(getattr(args, "config_file", None), getattr(args, "opts", None))
        return
    raise CommandError(f"python {script}: not a script these pages may use")


def _bash_syntax(script):
    done = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise CommandError(f"bash -n {script}: {done.stderr.strip()}")


def _script_options(script):
    """The options a script's ``case`` takes, and which of them take a value."""
    options, with_value = set(), set()
    for line in _read(os.path.join(ROOT, script)).splitlines():
        match = re.match(r"^\s+([-a-z| ]+)\)\s", line)
        if match and match.group(1).strip().startswith("-"):
            for option in (o.strip() for o in match.group(1).split("|")):
                options.add(option)
                if "${2:?" in line:
                    with_value.add(option)
    return options, with_value


def check_slurm_script(script, argv, env):
    if len(argv) < 4:
        raise CommandError(f"{script} needs PARTITION JOB_NAME GPUS CONFIG, got {argv}")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DDETR_"))}
    run_env.update({k: v for k, v in env.items() if k != "DDETR_SLURM_TASK"}, DRY_RUN="1")
    # The submitting side in dry-run mode prints the srun command after the script's own checks.
    done = subprocess.run(
        ["bash", script, *argv], cwd=ROOT, env=run_env, capture_output=True, text=True
    )
    if done.returncode:
        raise CommandError(f"{script} {argv}: {done.stderr.strip()}")
    check_train_net(["--config-file", argv[3], *argv[4:]])


def check_script(script, argv, env):
    if not os.path.isfile(os.path.join(ROOT, script)):
        raise CommandError(f"{script} does not exist")
    _bash_syntax(script)
    name = os.path.basename(script)
    if name == "run_dist_slurm.sh":
        return check_slurm_script(script, argv, env)
    if name == "quickstart.sh":
        return check_config("configs/quickstart.yaml", argv)
    if name == "test.sh":
        return check_pytest(argv)
    if name == "setup_env.sh":
        if argv:
            raise CommandError(f"{script} takes no arguments, got {argv}")
        return
    if name == "gpu_check.sh":
        options, with_value = _script_options(script)
        args = list(argv)
        while args:
            arg = args.pop(0)
            if arg == "--":
                from deformable_detr.benchmark import gpu

                parse_with(gpu.main, args, "python -m deformable_detr.benchmark.gpu")
                return
            if arg not in options:
                raise CommandError(f"{script}: unknown option {arg!r} (it takes {sorted(options)})")
            if arg in with_value and not args:
                raise CommandError(f"{script}: {arg} needs a value")
            if arg in with_value:
                args.pop(0)
        return
    raise CommandError(f"{script}: a script these pages may not use")


def check_command(command):
    """Raise CommandError unless ``command`` works with the current code (parsing only)."""
    env, argv = split_command(command)
    if argv[0] == "srun":
        # srun's own options, then `env VAR=value ...`, then the command it runs.
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
        if argv and argv[0] == "env":
            argv = argv[1:]
            while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                key, value = argv.pop(0).split("=", 1)
                env[key] = value
        if not argv:
            raise CommandError("srun without a command")
    program = argv[0]
    if program in PYTHONS:
        return check_python(argv[1:])
    if program == "bash":
        if len(argv) < 2:
            raise CommandError("bash without a script")
        return check_script(argv[1], argv[2:], env)
    if program.endswith(".sh"):
        return check_script(program, argv[1:], env)
    if program.startswith(".venv/bin/") and os.path.basename(program) in KNOWN_TOOLS:
        return
    raise CommandError(f"unknown program {program!r}")


# ------------------------------------------------------------------------------------------------
# Links and test names


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text):
    seen, found = {}, set()
    for line in prose(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text):
    """``(line number, target)`` of every Markdown link and picture outside code."""
    # Code spans are blanked, keeping their line breaks so that line numbers stay.
    body = re.sub(r"`[^`]*`", lambda m: "\n" * m.group().count("\n"), "\n".join(prose(text)))
    found = []
    for number, line in enumerate(body.split("\n"), 1):
        for target in re.findall(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)", line):
            found.append((number, target))
    return found


def link_problem(page, target):
    """Why a link of ``page`` (a path) is broken, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return None  # http(s), mailto: not checked here
    path, _, fragment = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(resolved):
        return f"{target}: {_rel(resolved)} does not exist"
    if fragment and resolved.endswith(".md") and fragment not in anchors(_read(resolved)):
        return f"{target}: no heading with anchor #{fragment} in {_rel(resolved)}"
    return None


def named_tests(text):
    """``(line number, reference)`` of test files and tests named in inline code."""
    pattern = r"(?:tests/[\w/]*)?test_\w+\.py(?:::[\w*]+)?"
    return [(number, ref) for number, span in spans(text) for ref in re.findall(pattern, span)]


def check_test_reference(reference):
    """A test path (``tests/...``, a file name, ``file::test``, a folder) names what exists."""
    path, _, name = reference.partition("::")
    name = name.split("[")[0]
    if "/" in path:
        files = [os.path.join(ROOT, path)]
        if not os.path.exists(files[0]):
            raise CommandError(f"{path} does not exist")
    else:
        files = glob.glob(os.path.join(ROOT, "tests", "**", path), recursive=True)
        if not files:
            raise CommandError(f"no test file {path} under tests/")
    if name and not any(
        fnmatch.filter(re.findall(r"^def (\w+)", _read(f), re.M), name) for f in files
    ):
        raise CommandError(f"{path} has no test {name}")


# ------------------------------------------------------------------------------------------------
# Parameters


def _command_params():
    demo_has_flag = PENDING_DEMO_FLAG in _read(os.path.join(ROOT, "demo.py"))
    params = []
    for page in PAGES:
        for line, command in page_commands(page):
            marks = []
            if PENDING_DEMO_FLAG in command and not demo_has_flag:
                marks.append(
                    pytest.mark.xfail(
                        strict=False,
                        reason=f"demo.py's {PENDING_DEMO_FLAG} is not merged yet",
                    )
                )
            params.append(pytest.param(command, id=f"{_rel(page)}:{line}", marks=marks))
    return params


def _link_params():
    params = []
    for page in PAGES:
        for line, target in links(_read(page)):
            marks = []
            path = target.partition("#")[0]
            resolved = _rel(os.path.normpath(os.path.join(os.path.dirname(page), path)))
            if resolved in PENDING_PICTURES and not os.path.exists(os.path.join(ROOT, resolved)):
                marks.append(pytest.mark.xfail(strict=False, reason=PENDING_PICTURES[resolved]))
            params.append(pytest.param(page, target, id=f"{_rel(page)}:{line}", marks=marks))
    return params


def _python_block_params():
    params = []
    for page in PAGES:
        for language, line, body in code_blocks(_read(page)):
            if language == "python":
                params.append(pytest.param(page, body, id=f"{_rel(page)}:{line}"))
    return params


def _reference_params():
    params = []
    for page in PAGES:
        for line, reference in named_tests(_read(page)):
            params.append(pytest.param(reference, id=f"{_rel(page)}:{line}"))
    return params


# ------------------------------------------------------------------------------------------------
# The checks of the pages


@pytest.mark.parametrize("command", _command_params())
def test_command_parses(command):
    for expanded in expand_placeholders(command):
        check_command(expanded)


@pytest.mark.parametrize("page, target", _link_params())
def test_relative_link_resolves(page, target):
    assert link_problem(page, target) is None, link_problem(page, target)


@pytest.mark.parametrize("reference", _reference_params())
def test_named_test_exists(reference):
    check_test_reference(reference)


@pytest.mark.parametrize("page, body", _python_block_params())
def test_python_block_compiles_and_imports(page, body):
    tree = ast.parse(body, filename=page)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_pages_are_found_and_have_commands():
    assert _rel(README) == "README.md" and len(PAGES) > 1
    assert len(page_commands(README)) >= 10


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_command_block_is_tagged(page):
    # A command in a block without a shell language would escape test_command_parses.
    assert untagged_command_blocks(_read(page)) == []


def test_readme_is_a_short_guide():
    assert len(_read(README).splitlines()) <= 300


# ------------------------------------------------------------------------------------------------
# Self-tests: each check rejects a synthetic mistake


@pytest.mark.parametrize(
    "command, message",
    [
        ("python train_net.py --config-file configs/r50.yaml SOLVER.NO_SUCH_KEY 1", "NO_SUCH_KEY"),
        (
            "python train_net.py --config-file configs/r50.yaml MODEL.DEFORMABLE_DETR.NUM_CLASSES x",
            "NUM_CLASSES",
        ),
        ("python train_net.py --config-file configs/nowhere.yaml", "does not exist"),
        ("python train_net.py --no-such-flag", "refuses"),
        (
            "python demo.py --config-file configs/quickstart.yaml --output o --no-such-flag",
            "refuses",
        ),
        ("python demo.py --config-file configs/quickstart.yaml --output o --opts SOLVER.X 1", "X"),
        (
            f"python {TOOLS_DIR}export_model.py --config-file configs/r50.yaml --format zip "
            "--output o",
            "refuses",
        ),
        ("python -m deformable_detr.benchmark.model --variants r51", "refuses"),
        ("python -m deformable_detr.benchmark.nowhere", "nowhere"),
        ("python -m pytest tests/nowhere", "does not exist"),
        ("python -m pytest tests/layers/test_ms_deform_attn_op.py::test_nothing", "no test"),
        ("bash scripts/test.sh tests/nowhere", "does not exist"),
        ("bash scripts/nowhere.sh", "does not exist"),
        ("bash scripts/gpu_check.sh --no-such-option", "unknown option"),
        ("bash scripts/gpu_check.sh -- --device tpu", "refuses"),
        ("bash scripts/quickstart.sh SOLVER.MAX_ITR 10", "MAX_ITR"),
        (f"{TOOLS_DIR}run_dist_slurm.sh p j many configs/r50.yaml", "GPUS"),
        (f"{TOOLS_DIR}run_dist_slurm.sh p j 8 configs/r50.yaml SOLVER.NOPE 1", "NOPE"),
        ("python train_net.py --config-file configs/r50.yaml | tee log", "one simple command"),
        ("curl https://example.com", "unknown program"),
    ],
)
def test_self_check_rejects_bad_commands(command, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        check_command(command)


def test_self_check_accepts_good_commands():
    check_command("OMP_NUM_THREADS=2 python train_net.py --config-file configs/quickstart.yaml")
    check_command("python demo.py --help")
    check_command(f"DRY_RUN=1 {TOOLS_DIR}run_dist_slurm.sh p j 16 configs/r50.yaml OUTPUT_DIR o")


def test_self_placeholders():
    assert len(expand_placeholders("x configs/<variant>.yaml <variant>")) == len(VARIANTS)
    with pytest.raises(CommandError, match="unknown placeholder"):
        expand_placeholders("python demo.py --input <picture>")


def test_self_reading_blocks():
    text = "\n".join(
        [
            "intro `python demo.py --help` and `not a command`",
            "```bash",
            "# a comment",
            "python train_net.py --config-file configs/r50.yaml \\",
            "    SOLVER.MAX_ITER 10",
            "```",
            "```",
            "python train_net.py --whatever",
            "```",
            "```",
            "[quickstart] done",
            "```",
        ]
    )
    bash = [(b, n) for lang, n, b in code_blocks(text) if lang == "bash"]
    assert block_commands(*bash[0]) == [
        (4, "python train_net.py --config-file configs/r50.yaml  SOLVER.MAX_ITER 10")
    ]
    assert inline_commands(text) == [(1, "python demo.py --help")]
    assert untagged_command_blocks(text) == [8]


def test_self_links(tmp_path):
    page = str(tmp_path / "page.md")
    (tmp_path / "other.md").write_text("# Other page\n\n## A `Key` (here)\n")
    text = "\n".join(
        [
            "# Title",
            "[ok](other.md) [ok](other.md#a-key-here) [ok](#title) [web](https://example.com)",
            "[broken](missing.md) ![picture](missing.png) [anchor](other.md#nowhere) [x](#none)",
            "`[not a link](missing.md)`",
            "```",
            "[not a link](missing.md)",
            "```",
        ]
    )
    with open(page, "w") as f:
        f.write(text)
    problems = [link_problem(page, target) for _, target in links(text)]
    assert problems[:4] == [None] * 4
    assert len(problems) == 8 and all(problems[4:])
    assert "missing.md does not exist" in problems[4] and "#nowhere" in problems[6]


def test_self_test_references():
    check_test_reference("tests/docs/test_readme_snippet.py::test_use_it_in_your_app_snippet")
    check_test_reference("test_bad_data.py::test_other_bad_records")
    check_test_reference("test_checkpointing_atomic.py::test_model_weights_pointing_at_*")
    for bad in ("tests/nowhere/test_x.py", "test_nowhere.py", "test_bad_data.py::test_nothing"):
        with pytest.raises(CommandError):
            check_test_reference(bad)
    assert named_tests("`tests/a/test_b.py::test_c`, `test_d.py`") == [
        (1, "tests/a/test_b.py::test_c"),
        (1, "test_d.py"),
    ]


def test_self_anchor_slugs():
    assert slug("Inference precision (`TEST.PRECISION`)") == "inference-precision-testprecision"
    assert slug("Other backbones: Swin-T and ConvNeXt-T (timm)") == (
        "other-backbones-swin-t-and-convnext-t-timm"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
