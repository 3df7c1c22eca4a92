"""The documentation against the code: README.md, docs/*.md and benchmarks/README.md.

Every fenced bash block is read command by command (continuation lines joined, comments and
`VAR=value` prefixes dropped) and each command is checked without running anything:

    pretrain [--config FILE] [key=value ...]   (also `.venv/bin/pretrain`, `python -m pretrain`,
        and behind accelerate launch / torchrun / launch/local_cpu.sh / launch/slurm.sbatch):
        FILE exists and pretrain.config.load_config(FILE, overrides) accepts it; with
        --resume RUN_DIR the overrides' keys are checked against load_config(None, overrides)
    pretrain shards ... / python -m pretrain.data.cli ...: the shards parser accepts it
    pretrain publish ...: the publish parser accepts it
    finetune MODE ...: finetune's parser accepts it, its --config file exists and
        load_finetune_config accepts the file with the overrides
    accelerate launch / torchrun: their own parsers accept the launcher options
    python -m benchmarks.NAME --flag ...: the module exists and defines each flag
    make TARGET: the Makefile has the target

Anywhere in the text: every repository path (configs/..., launch/..., pretrain/..., ...) and every
`*.yaml` name exists, every dotted name (pretrain.x.y) imports or resolves, every relative link
and its #anchor resolve, and no lab-notebook dates ("today", 2026-11-30) appear outside the
measured numbers in benchmarks/README.md. README.md stays short and starts with the two make
commands; docs/configuration.md documents exactly the keys the config dataclasses have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import io
import re
import shlex
from pathlib import Path

import braceexpand
import pytest
from helpers import ROOT

README = ROOT / "README.md"
BENCHMARKS_README = ROOT / "benchmarks" / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
ALL_DOCS = [*DOCS, BENCHMARKS_README]
SEPARATORS = {"&&", "||", ";", "|"}
REDIRECTIONS = {"<", ">", ">>", "2>", "2>&1"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHON = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- reading the documents ------------------------------------------------------------------------


def fenced_blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line number of the opening fence, language, lines) of every fenced block."""
    blocks, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if current is None and stripped.startswith("```"):
            current = (number, stripped[3:].strip(), [])
        elif current is not None and stripped == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, f"{rel(path)}: fenced block at line {current[0]} is not closed"
    return blocks


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Join `\\` continuations; (line number, text) of each logical line."""
    joined, start, parts = [], None, []
    for offset, line in enumerate(lines, start=first + 1):
        if start is None:
            start = offset
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        joined.append((start, " ".join(parts)))
        start, parts = None, []
    if parts:
        joined.append((start, " ".join(parts)))
    return joined


def split_commands(text: str) -> list[list[str]]:
    """Simple commands of one logical line: split at && || ; |, without redirections and
    leading VAR=value assignments."""
    tokens = shlex.split(text, comments=True)
    commands, current = [], []
    for token in [*tokens, ";"]:
        if token in SEPARATORS:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    cleaned = []
    for argv in commands:
        kept, skip_next = [], False
        for token in argv:
            if skip_next:
                skip_next = False
            elif token in REDIRECTIONS:
                skip_next = token != "2>&1"
            else:
                kept.append(token)
        while kept and ENV_ASSIGNMENT.match(kept[0]):
            kept.pop(0)
        if kept:
            cleaned.append(kept)
    return cleaned


def bash_commands(paths: list[Path]) -> list[tuple[str, list[str]]]:
    """("FILE:LINE", argv) of every command in every bash block of `paths`."""
    found = []
    for path in paths:
        for first, language, lines in fenced_blocks(path):
            if language not in ("bash", "sh", "shell"):
                continue
            for number, text in logical_lines(lines, first):
                for argv in split_commands(text):
                    found.append((f"{rel(path)}:{number}", argv))
    return found


COMMANDS = bash_commands(ALL_DOCS)
PROGRAMS = {"pretrain", "finetune", "make", "sbatch", "accelerate", "torchrun", "local_cpu.sh"}
# The commands this test knows how to check (cheap to tell: no parser is imported here).
CHECKED = [
    (where, argv)
    for where, argv in COMMANDS
    if Path(argv[0]).name in PROGRAMS or (PYTHON.match(argv[0]) and argv[1:2] == ["-m"])
]


# --- what each command is -------------------------------------------------------------------------


def _parse_quietly(parser, args: list[str]):
    """argparse result, or AssertionError with argparse's message instead of SystemExit."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(args)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            return None
        message = errors.getvalue().strip().splitlines()[-1:]
        raise AssertionError(f"{parser.prog} rejects {args}: {message}") from None


def launched_module(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) for `accelerate launch ... -m M ...` and `torchrun ... -m M ...`,
    after checking the launcher's own options with its parser."""
    name = Path(argv[0]).name
    if name == "accelerate" and argv[1:2] == ["launch"]:
        from accelerate.commands.launch import launch_command_parser

        args = _parse_quietly(launch_command_parser(), argv[2:])
    elif name == "torchrun" or (
        PYTHON.match(argv[0]) and argv[1:3] == ["-m", "torch.distributed.run"]
    ):
        from torch.distributed.run import get_args_parser

        args = _parse_quietly(get_args_parser(), argv[1:] if name == "torchrun" else argv[3:])
    else:
        return None
    assert args is not None and args.module, f"{argv}: the launcher should run a module (-m)"
    return args.training_script, list(args.training_script_args)


def classify(argv: list[str]) -> tuple[str, list[str]] | None:
    """("pretrain" | "finetune" | "benchmarks.NAME" | "make", arguments), or None."""
    name = Path(argv[0]).name
    if name in ("pretrain", "finetune"):
        return name, argv[1:]
    if PYTHON.match(argv[0]) and argv[1:2] == ["-m"] and len(argv) > 2:
        module = argv[2]
        if module == "pretrain.data.cli":
            return "pretrain", ["shards", *argv[3:]]
        if module in ("pretrain", "finetune") or module.startswith("benchmarks."):
            return module, argv[3:]
    if argv[0] == "launch/local_cpu.sh":
        return "pretrain", argv[1:]
    if name == "sbatch":
        script = next((i for i, token in enumerate(argv) if token.endswith("slurm.sbatch")), None)
        return ("pretrain", argv[script + 1 :]) if script is not None else None
    if name == "make":
        return "make", argv[1:]
    launched = launched_module(argv)
    if launched is not None and launched[0] in ("pretrain", "finetune"):
        return launched
    return None


# --- the checks of one command --------------------------------------------------------------------


def check_pretrain(args: list[str]) -> None:
    from pretrain.config import load_config

    if args[:1] == ["shards"]:
        from pretrain.data.cli import _parser

        try:
            _parse_quietly(_parser(), args[1:])
        except Exception as error:  # the shards parser raises DataError for usage mistakes
            raise AssertionError(f"pretrain shards rejects {args[1:]}: {error}") from None
        return
    if args[:1] == ["publish"]:
        from pretrain.hub import parser

        _parse_quietly(parser(), args[1:])
        return
    config, resume, overrides = None, None, []
    tokens = iter(args)
    for token in tokens:
        if token in ("-h", "--help"):
            return
        option, equals, value = token.partition("=")
        if option in ("--config", "--resume"):
            value = value if equals else next(tokens, None)
            assert value, f"{option} needs a value"
            if option == "--config":
                config = value
            else:
                resume = value
        elif token.startswith("-"):
            raise AssertionError(f"pretrain has no option {token}")
        else:
            overrides.append(token)
    if resume is not None:
        assert config is None, "--resume takes the run's own config; --config is refused"
        load_config(None, overrides)  # the run dir is a placeholder; the keys must exist
        return
    if config is not None:
        assert (ROOT / config).is_file(), f"config file not found: {config}"
        load_config(ROOT / config, overrides)
    else:
        load_config(None, overrides)


def check_finetune(args: list[str]) -> None:
    from finetune.__main__ import build_parser
    from finetune.config import load_finetune_config

    parsed = _parse_quietly(build_parser(), args)
    if parsed is None:  # --help
        return
    if parsed.config is not None:
        assert (ROOT / parsed.config).is_file(), f"config file not found: {parsed.config}"
        load_finetune_config(ROOT / parsed.config, None, parsed.overrides)
    else:
        load_finetune_config(None, None, parsed.overrides)


def check_benchmark(module: str, args: list[str]) -> None:
    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"no benchmark module {module}"
    text = source.read_text() + (ROOT / "benchmarks" / "harness.py").read_text()
    for token in args:
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or flag in ("--help",):
            continue
        positive = "--" + flag[len("--no-") :] if flag.startswith("--no-") else flag
        assert f'"{flag}"' in text or f'"{positive}"' in text, f"{module} has no option {flag}"


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", text, flags=re.MULTILINE))


def check_command(argv: list[str]) -> None:
    kind = classify(argv)
    if kind is None:
        return
    program, args = kind
    if program == "pretrain":
        check_pretrain(args)
    elif program == "finetune":
        check_finetune(args)
    elif program.startswith("benchmarks."):
        check_benchmark(program, args)
    elif program == "make":
        missing = set(args) - makefile_targets()
        assert not missing, f"Makefile has no target {sorted(missing)}"


@pytest.mark.parametrize("where, argv", CHECKED, ids=[where for where, _ in CHECKED])
def test_each_documented_command_parses_with_the_real_parsers(where, argv):
    check_command(argv)


def test_the_docs_hold_the_commands_this_test_is_about():
    """The extraction works: the main commands of each kind are found and recognised."""
    kinds = [classify(argv) for _, argv in COMMANDS]
    programs = {kind[0] for kind in kinds if kind is not None}
    assert {"pretrain", "finetune", "make"} <= programs
    assert any(name.startswith("benchmarks.") for name in programs)
    shards = [
        kind for kind in kinds if kind and kind[0] == "pretrain" and kind[1][:1] == ["shards"]
    ]
    resumes = [kind for kind in kinds if kind and kind[0] == "pretrain" and "--resume" in kind[1]]
    assert shards and resumes


# --- the checks fail when they should -------------------------------------------------------------


@pytest.mark.parametrize(
    "line, fragment",
    [
        (".venv/bin/pretrain --config configs/pretrain/no_such.yaml", "not found"),
        (".venv/bin/pretrain --config configs/pretrain/demo_mae.yaml train.step=2", "train.step"),
        (".venv/bin/pretrain --resume runs/x mae.mask_ratio=0.5 train.stepz=4", "train.stepz"),
        ("launch/local_cpu.sh --config configs/pretrain/demo_mae.yaml model.nam=x", "model.nam"),
        ("sbatch --nodes 2 launch/slurm.sbatch trian.steps=5", "trian"),
        (".venv/bin/pretrain --confg configs/pretrain/demo_mae.yaml", "--confg"),
        (".venv/bin/pretrain --config=configs/pretrain/demo_maee.yaml", "not found"),
        (".venv/bin/pretrain shards imagefolder src", "required"),
        (".venv/bin/finetune linear --encoder runs/x --config configs/finetune/none.yaml", "found"),
        (".venv/bin/finetune knn --encoder runs/x knn.kk=3", "knn.kk"),
        (".venv/bin/finetune zeroshot --encoder runs/x --epochs 3", "--epochs"),
        ("accelerate launch --bogus -m pretrain --config configs/pretrain/demo_mae.yaml", "bogus"),
        (
            "accelerate launch --multi_gpu -m finetune full --encoder r full.epoch=1",
            "full.epoch",
        ),
        ("python -m benchmarks.probe --no-such-flag 3", "--no-such-flag"),
        ("python -m benchmarks.nothing", "benchmarks.nothing"),
        ("make deploy", "deploy"),
    ],
)
def test_a_wrong_command_fails_the_check(line, fragment):
    (argv,) = split_commands(line)
    with pytest.raises(Exception, match=re.escape(fragment)):
        check_command(argv)


def test_commands_are_split_joined_and_stripped_like_a_shell_would():
    block = ["OMP_NUM_THREADS=1 make demo   # a comment", "a \\", "  b && c < in.csv | d"]
    commands = [argv for _, text in logical_lines(block, 0) for argv in split_commands(text)]
    assert commands == [["make", "demo"], ["a", "b"], ["c"], ["d"]]


# --- names in the text ----------------------------------------------------------------------------

REPO_PATH = re.compile(
    r"(?<![\w./-])((?:configs|launch|pretrain|finetune|tests|benchmarks|docs)/[\w.{},*/-]*)"
)
YAML_NAME = re.compile(r"`([\w{},.-]+\.yaml)`")
DOTTED_NAME = re.compile(r"(?<![\w./-])((?:pretrain|finetune|benchmarks)(?:\.\w+)+)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NOT_OURS = {"config.yaml"}  # the run directory's file, not a shipped config


def expand(name: str) -> list[str]:
    return list(braceexpand.braceexpand(name))


def exists(relative: str) -> bool:
    if any(character in relative for character in "*?["):
        return bool(glob.glob(str(ROOT / relative)))
    return (ROOT / relative).exists()


def named_paths(path: Path) -> set[str]:
    names = set()
    for match in REPO_PATH.finditer(path.read_text()):
        names.update(name.rstrip(".,") for name in expand(match.group(1)))
    return names


@pytest.mark.parametrize("path", ALL_DOCS, ids=rel)
def test_every_repository_path_named_exists(path):
    missing = sorted(name for name in named_paths(path) if not exists(name))
    assert not missing, f"{rel(path)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("path", ALL_DOCS, ids=rel)
def test_every_yaml_file_named_exists(path):
    folders = ("", "configs/pretrain/", "configs/finetune/", "launch/")
    missing = []
    for match in YAML_NAME.finditer(path.read_text()):
        for name in expand(match.group(1)):
            if name not in NOT_OURS and not any(exists(folder + name) for folder in folders):
                missing.append(name)
    assert not missing, f"{rel(path)} names config files that do not exist: {missing}"


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("path", ALL_DOCS, ids=rel)
def test_every_dotted_python_name_resolves(path):
    names = {match.group(1) for match in DOTTED_NAME.finditer(path.read_text())}
    names = {name for name in names if not re.search(r"\.[A-Z_]+(\.|$)", name)}  # benchmarks.NAME
    missing = sorted(name for name in names if not resolves(name))
    assert not missing, f"{rel(path)} names modules or attributes that do not exist: {missing}"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found, seen = set(), {}
    in_block = False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
        if in_block or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


@pytest.mark.parametrize("path", ALL_DOCS, ids=rel)
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for match in LINK.finditer(path.read_text()):
        target = match.group(1)
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, f"{rel(path)} has broken links: {broken}"


NOTEBOOK = re.compile(
    r"\b(today|yesterday|this (?:morning|afternoon|session)|previous session|"
    r"on a given afternoon|20\d\d-\d\d-\d\d|20\d\d\d\d\d\d-\d{6})\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_no_lab_notebook_dates_outside_the_benchmark_results(path):
    found = sorted({match.group(0) for match in NOTEBOOK.finditer(path.read_text())})
    assert not found, (
        f"{rel(path)}: dated or diary wording belongs in benchmarks/README.md: {found}"
    )


# --- README shape ---------------------------------------------------------------------------------


def test_readme_is_short_and_starts_with_the_two_make_commands():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; details belong in docs/"
    first = fenced_blocks(README)[0]
    commands = [
        argv[:2] for _, text in logical_lines(first[2], first[0]) for argv in split_commands(text)
    ]
    assert commands[:2] == [["make", "demo"], ["make", "test"]], commands


def test_readme_links_every_docs_page():
    text = README.read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


# --- the config reference -------------------------------------------------------------------------


def documented_keys(text: str) -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", text, flags=re.MULTILINE))


def config_keys(config) -> set[str]:
    return {
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(config)
        for key in dataclasses.fields(getattr(config, section.name))
    }


def test_the_config_reference_lists_exactly_the_real_keys():
    from finetune.config import FinetuneConfig
    from pretrain.config import load_config

    text = (ROOT / "docs" / "configuration.md").read_text()
    pretraining, marker, finetuning = text.partition("\n## Finetuning")
    assert marker, "docs/configuration.md needs a '## Finetuning' section"
    for documented, real, what in (
        (documented_keys(pretraining), config_keys(load_config()), "pretraining"),
        (documented_keys(finetuning), config_keys(FinetuneConfig()), "finetuning"),
    ):
        assert not documented - real, f"{what}: documented but unknown: {documented - real}"
        assert not real - documented, f"{what}: keys without a row: {sorted(real - documented)}"
