"""scripts/find_python.sh: the interpreter scripts/env.sh builds .venv with, or the fix."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")


def find_python(path: Path, **env: str) -> subprocess.CompletedProcess:
    """The script with only the fake interpreters in `path` on PATH."""
    return subprocess.run(
        [BASH, str(ROOT / "scripts" / "find_python.sh")],
        env={"PATH": str(path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def fake_pythons(folder: Path, **versions: str) -> Path:
    """Interpreters named like `python3_12` (for python3.12) that answer with their version."""
    for name, version in versions.items():
        script = folder / name.replace("_", ".")
        script.write_text(f"#!/bin/sh\necho {version}\n")
        script.chmod(0o755)
    return folder


def test_python311_first(tmp_path):
    fake_pythons(tmp_path, python3_11="3.11", python3_12="3.12", python3="3.12")
    assert find_python(tmp_path).stdout.strip() == str(tmp_path / "python3.11")


def test_a_machine_with_only_python312(tmp_path):
    fake_pythons(tmp_path, python3_12="3.12", python3="3.12")
    assert find_python(tmp_path).stdout.strip() == str(tmp_path / "python3.12")


def test_python3_when_it_is_recent_enough(tmp_path):
    fake_pythons(tmp_path, python3="3.13")
    assert find_python(tmp_path).stdout.strip() == str(tmp_path / "python3")


def test_none_that_fits_names_what_was_found_and_the_fix(tmp_path):
    fake_pythons(tmp_path, python3="3.10", python3_15="3.15")
    result = find_python(tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert "No Python 3.11 to 3.14 found on PATH (python3 is 3.10)." in result.stderr
    assert "PYTHON=/path/to/python3.12 scripts/demo" in result.stderr


def test_python_set_wins_and_is_checked(tmp_path):
    fake_pythons(tmp_path, python3_11="3.11", mine="3.12", old="3.9")
    assert find_python(tmp_path, PYTHON="mine").stdout.strip() == "mine"
    result = find_python(tmp_path, PYTHON="old")
    assert result.returncode == 1
    assert "PYTHON=old is Python 3.9; the project needs Python 3.11 to 3.14" in result.stderr
    assert "does not run" in find_python(tmp_path, PYTHON="missing").stderr
