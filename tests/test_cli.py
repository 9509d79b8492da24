"""The command line, as a user runs it: `python -m syncdiffusion ...`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from syncdiffusion.__main__ import main
from syncdiffusion.files import read_parameters

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "syncdiffusion", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_writes_the_panorama(tiny_weights, tmp_path):
    out = tmp_path / "pano.png"
    result = run_cli(
        "--prompt",
        "a forest",
        "--weights",
        str(tiny_weights),
        "--output",
        str(out),
        "--width",
        "768",
        "--num-inference-steps",
        "2",
        "--sync-threshold",
        "1",
        "--seed",
        "4",
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.size == (768, 512)
    assert "2/2" in result.stderr  # the progress bar


def test_from_png_makes_the_same_panorama_again(tiny_weights, tmp_path):
    first, again = tmp_path / "first.png", tmp_path / "again.webp"
    common = ("--weights", str(tiny_weights))
    made = run_cli(
        "--prompt",
        "a cove",
        "--width",
        "520",
        "--height",
        "512",
        "--stride",
        "24",
        "--num-inference-steps",
        "2",
        "--sync-threshold",
        "1",
        "--seed",
        "31",
        "--loop-closure",
        "--output",
        str(first),
        *common,
    )
    assert made.returncode == 0, made.stderr
    remade = run_cli(
        "--from-png", str(first), "--output", str(again), "--output-quality", "100", *common
    )
    assert remade.returncode == 0, remade.stderr
    assert read_parameters(again) == read_parameters(first)
    with Image.open(first) as a:
        reference = a.convert("RGB").tobytes()
    third = tmp_path / "third.png"
    assert run_cli("--from-png", str(first), "--output", str(third), *common).returncode == 0
    with Image.open(third) as b:
        assert b.convert("RGB").tobytes() == reference


def test_cli_names_the_bad_input(tiny_weights, tmp_path):
    result = run_cli(
        "--prompt",
        "a forest",
        "--weights",
        str(tiny_weights),
        "--output",
        str(tmp_path / "x.png"),
        "--stride",
        "12",
    )
    assert result.returncode == 2
    assert "stride must be a multiple of 8 from 8 to 56" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_names_the_missing_weights(tmp_path):
    result = run_cli("--prompt", "a forest", "--weights", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "download_weights.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_input_is_an_option():
    help_text = run_cli("--help").stdout
    for flag in (
        "--prompt",
        "--negative-prompt",
        "--width",
        "--height",
        "--guidance-scale",
        "--sync-weight",
        "--sync-decay-rate",
        "--sync-freq",
        "--sync-threshold",
        "--num-inference-steps",
        "--stride",
        "--seed",
        "--loop-closure",
        "--weights",
    ):
        assert flag in help_text


def test_a_nul_in_the_prompt_is_escaped_in_its_text_chunk(tiny_weights, tmp_path):
    out = tmp_path / "nul.png"
    argv = ["--prompt", "a\0b", "--weights", str(tiny_weights), "--output", str(out)]
    argv += ["--width", "512", "--num-inference-steps", "1", "--sync-threshold", "0"]
    assert main(argv) == 0
    # PNG text holds no NUL: readers end the text there.
    assert b"prompt\0a\0b" not in out.read_bytes()
    with Image.open(out) as image:
        assert image.text["prompt"] == "a\\x00b"
    assert read_parameters(out)["prompt"] == "a\0b"  # the JSON chunk is the source of truth
