"""Every command and code block of README.md and docs/*.md, on the tiny model.

`python` blocks run, and `python -m syncdiffusion` commands in `sh` blocks too, made quick:
QUICK's values replace what the block says. Every other command must be a script of this
project whose `--help` lists every option the block gives it. A block after a comment
`<!-- skip: REASON -->` (it needs a GPU, the network, Docker or the cog CLI) is not run, but
the options of this project's commands in it are still checked. docs/development.md says so.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import syncdiffusion.cli.generate as cli
from syncdiffusion import SyncDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A panorama the tiny model makes in seconds, whatever size and steps a block asks for.
QUICK: dict[str, Any] = {"width": 512, "num_inference_steps": 1, "sync_threshold": 1}
QUICK_OPTIONS = [item for k, v in QUICK.items() for item in ("--" + k.replace("_", "-"), str(v))]
FENCE = re.compile(
    r"^(?:<!-- skip: (?P<skip>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M
)
PYTHONS = {"python", ".venv/bin/python"}


def blocks(path: Path, lang: str) -> list[tuple[int, str, str | None]]:
    """(line, body, skip reason) of every fenced block of `lang` in `path`."""
    text = path.read_text()
    return [
        (text.count("\n", 0, m.start("body")) + 1, m["body"], m["skip"])
        for m in FENCE.finditer(text)
        if m["lang"] == lang
    ]


def commands(body: str) -> list[list[str]]:
    """A shell block's commands as argv lists: continuation lines joined, comments, `&&` and
    leading VAR=value assignments left out."""
    found = []
    for line in body.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;", line):
            argv = shlex.split(part, comments=True)
            while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                argv = argv[1:]
            if argv:
                found.append(argv)
    return found


def project_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """("cli" or the script's path, its arguments) for a command of this project, else None."""
    if argv[0] in PYTHONS and argv[1:3] == ["-m", "syncdiffusion"]:
        return "cli", argv[3:]
    if argv[0] in PYTHONS and argv[1:2] == ["-m"] and argv[2].startswith("syncdiffusion."):
        return argv[2], argv[3:]  # a command of the package: python -m syncdiffusion.batch
    if argv[0] in PYTHONS and len(argv) > 1 and argv[1].startswith("scripts/"):
        return argv[1], argv[2:]
    if argv[0].startswith("scripts/"):
        return argv[0], argv[1:]
    return None


def options(args: list[str]) -> set[str]:
    return {arg.split("=")[0] for arg in args if arg.startswith("--")}


@pytest.fixture(scope="module")
def help_options(run_script):
    """The options a command's --help lists, by command (each script asked once)."""
    cache: dict[str, set[str]] = {"cli": set(cli.build_parser()._option_string_actions)}

    def listed(command: str) -> set[str]:
        if command not in cache and command.startswith("syncdiffusion."):
            result = subprocess.run(
                [sys.executable, "-m", command, "--help"],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, result.stderr
            cache[command] = set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))
        if command not in cache:
            name = Path(command).name
            if not (ROOT / command).is_file():
                pytest.fail(f"{command} does not exist")
            if name == "test":  # its arguments go to pytest
                cache[command] = set()
                return cache[command]
            script = "demo.py" if name == "demo" else name
            result = run_script(script, "--help")
            assert result.returncode == 0, result.stderr
            cache[command] = set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))
        return cache[command]

    return listed


class Quick:
    """The session's tiny pipeline, with QUICK's values over the ones a call gives."""

    def __init__(self, pipe: SyncDiffusionPipeline) -> None:
        self._pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, **inputs: Any) -> Any:
        return self._pipe(**{**inputs, **QUICK})


@pytest.fixture
def docs_folder(tmp_path, tiny_weights, pipe, monkeypatch) -> Path:
    """A working folder whose weights/ is the tiny model; every pipeline loaded is Quick."""
    (tmp_path / "weights").symlink_to(tiny_weights)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SyncDiffusionPipeline, "from_pretrained", lambda *a, **k: Quick(pipe))
    return tmp_path


def shell_cases() -> list:
    return [
        pytest.param(path, line, body, skip, id=f"{path.name}:{line}")
        for path in DOCUMENTS
        for line, body, skip in blocks(path, "sh")
    ]


@pytest.mark.parametrize(("path", "line", "body", "skip"), shell_cases())
def test_shell_block(path, line, body, skip, help_options, docs_folder):
    for argv in commands(body):
        known = project_command(argv)
        if known is None:
            assert skip, (
                f"{path.name}:{line}: {argv[0]!r} is no command of this project; "
                "mark the block <!-- skip: why -->"
            )
            continue
        command, args = known
        unknown = options(args) - help_options(command)
        assert not unknown, f"{path.name}:{line}: {command} has no {sorted(unknown)}"
        if command == "cli" and not skip:
            assert cli.main([*args, *QUICK_OPTIONS]) == 0, f"{path.name}:{line}: {argv}"
    if skip:
        pytest.skip(skip)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_python_blocks(path, docs_folder):
    found = blocks(path, "python")
    if not found:
        pytest.skip("no python blocks")
    namespace: dict[str, Any] = {}  # a document's blocks run in order, as one session
    skipped = []
    for line, body, skip in found:
        if skip:
            compile(body, f"{path.name}:{line}", "exec")  # at least it parses
            skipped.append(skip)
            continue
        exec(compile(body, f"{path.name}:{line}", "exec"), namespace)
    if skipped:
        pytest.skip("; ".join(skipped))


DESCRIPTION_COLUMN = 25  # where the layout's descriptions start; names sit left of it


def layout_tree(layout: str) -> dict[str, str]:
    """Every path the layout's tree names, with the text of its entry (its line, and for a
    folder the lines under it). A line's names are its first word and the words after it that
    look like paths (a dot or a slash in them), up to the first gap of two spaces; a name ending
    in / is a folder, and the names indented under it are inside it."""
    lines = layout.splitlines()
    entries: dict[str, str] = {}
    folders: list[tuple[int, str]] = []  # (indent, path) of the folders the line is inside
    for number, line in enumerate(lines):
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= DESCRIPTION_COLUMN - 1:
            continue  # a description carried over
        while folders and folders[-1][0] >= indent:
            folders.pop()
        words = re.split(r"[ ,]+", line.strip().split("  ")[0])
        names = [words[0], *itertools.takewhile(lambda w: "." in w or "/" in w, words[1:])]
        below = next(
            (n for n in range(number + 1, len(lines)) if lines[n].strip()
             and len(lines[n]) - len(lines[n].lstrip(" ")) <= indent),
            len(lines),
        )
        parent = folders[-1][1] if folders else ""
        for name in names:
            entry = lines[number:below] if name.endswith("/") else [line]
            entries[parent + name] = "\n".join(entry)
        if len(names) == 1 and names[0].endswith("/"):
            folders.append((indent, parent + names[0]))
    return entries


def test_the_layout_is_the_tree():
    """docs/development.md's layout names every file git tracks at its place in the tree (or in
    its folder's entry), and names nothing that is not there."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    [(_, layout, _)] = blocks(ROOT / "docs" / "development.md", "text")
    tree = layout_tree(layout)

    def listed(path: str) -> bool:
        if path in tree:
            return True
        folder, name = path.rpartition("/")[0], Path(path).name
        while True:  # named in the entry of its folder, or of a folder above it
            text = tree.get(folder + "/", "") if folder else layout
            if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", text):
                return True
            if not folder:
                return False
            folder = folder.rpartition("/")[0]

    missing = [f for f in files if not listed(f)]
    assert not missing, f"docs/development.md's layout lacks {missing} (or names them elsewhere)"
    folders = {str(parent) + "/" for f in files for parent in Path(f).parents if str(parent) != "."}
    stale = [path for path in tree if path not in files and path not in folders]
    assert not stale, f"docs/development.md's layout names {stale}, which git does not track"
