"""The command line, as a user runs it: `python -m syncdiffusion ...`."""

from __future__ import annotations

import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from syncdiffusion.cli.generate import SyncDiffusionPipeline, main
from syncdiffusion.request.image_file import PARAMETERS_KEY, read_parameters, save_image
from syncdiffusion.testing.lora import make_lora

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


# --- --from-png on crafted files: one line naming the file, exit status 2 ---------------------


def _png_with_text(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def _jpeg_describing_as_short(path):
    """A JPEG file whose EXIF ImageDescription, the parameters' tag, is a SHORT, not text."""
    entry = struct.pack("<HHIHH", 0x010E, 3, 1, 7, 0)  # tag, type SHORT, count, value, padding
    exif = b"Exif\0\0II*\0" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0)
    Image.new("RGB", (8, 8)).save(path, format="JPEG", exif=exif)


def _png_header(path, width, height):
    """A PNG file's signature and header only: its size, claimed without any pixels."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _png_with_text(p, '"a forest"'), "must be a JSON object; got a str"),
        (lambda p: _png_with_text(p, "[1, 2]"), "must be a JSON object; got a list"),
        (lambda p: _png_with_text(p, "7"), "must be a JSON object; got a int"),
        (lambda p: _png_with_text(p, "{"), "are not valid JSON"),
        (lambda p: _png_with_text(p, "[" * 200_000), "nested too deeply"),
        (_jpeg_describing_as_short, "ImageDescription is not text but int"),
        (lambda p: _png_header(p, 100_000, 100_000), "too large to be a panorama"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"), "is not an image this tool can read"),
        (lambda p: Image.new("RGB", (8, 8)).save(p), "carries no SyncDiffusion parameters"),
    ],
)
def test_from_png_refuses_a_crafted_file_in_one_line(make, message, tmp_path, capsys, monkeypatch):
    path = tmp_path / "crafted.png"
    make(path)

    def no_decoding(self):
        raise AssertionError("reading the parameters decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(SystemExit) as exit_:
        main(["--from-png", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --from-png: {path}")
    assert message in err


def _saved(path, **changes):
    parameters = {"prompt": "a cove", "width": 512, "num_inference_steps": 1, "sync_threshold": 0}
    save_image(Image.new("RGB", (8, 8)), path, {**parameters, **changes})
    return path


def test_from_png_refuses_saved_values_the_model_does_not_take(tiny_weights, tmp_path, capsys):
    path = _saved(tmp_path / "bad.png", width=[512], stride=12, loop_closure="yes")
    argv = ["--from-png", str(path), "--weights", str(tiny_weights)]
    assert main([*argv, "--output", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --from-png {path}: ")
    assert "width must be a multiple of 8 from 512 to 4096; got [512]" in err
    assert "stride must be a multiple of 8 from 8 to 56" in err and "got 'yes'" in err
    # Given on the command line, a value replaces the file's bad one.
    fixed = ["--width", "512", "--stride", "16", "--no-loop-closure"]
    assert main([*argv, *fixed, "--output", str(tmp_path / "out.png")]) == 0


def test_from_png_prints_a_saved_model_without_its_control_characters(
    tiny_weights, tmp_path, capsys
):
    path = _saved(tmp_path / "odd.png", model="\x1b[2J\x1b[31mevil")
    argv = ["--from-png", str(path), "--weights", str(tiny_weights)]
    assert main([*argv, "--output", str(tmp_path / "out.png")]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "made by another model ('\\x1b[2J\\x1b[31mevil')" in err


def test_recompute_always_or_never_makes_the_same_picture(tiny_weights, tmp_path):
    common = ["--prompt", "a cove", "--weights", str(tiny_weights), "--width", "640"]
    common += ["--num-inference-steps", "1", "--sync-threshold", "1", "--seed", "2"]
    pictures = []
    for mode in ("always", "never"):
        out = tmp_path / f"{mode}.png"
        assert main([*common, "--recompute", mode, "--output", str(out)]) == 0
        with Image.open(out) as image:
            pictures.append(image.tobytes())
    assert pictures[0] == pictures[1]


def test_a_recompute_mode_outside_the_three_is_refused_naming_them(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--prompt", "a cove", "--recompute", "sometimes"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "--recompute: invalid choice: 'sometimes'" in error
    assert "(choose from 'auto', 'always', 'never')" in error


def test_a_prompt_that_is_not_utf8_is_refused_in_one_line(tiny_weights, tmp_path):
    """A Latin-1 byte in a UTF-8 shell reaches Python as a lone surrogate: named, no traceback."""
    out = tmp_path / "pano.png"
    result = run_cli(
        "--prompt",
        b"caf\xe9",
        "--weights",
        str(tiny_weights),
        "--output",
        str(out),
        "--width",
        "512",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "error: prompt must be valid Unicode text (encodable as UTF-8)" in result.stderr
    assert "'\\udce9' at position 3" in result.stderr
    assert not out.exists()


def test_from_png_refuses_a_saved_prompt_that_is_not_valid_unicode(tiny_weights, tmp_path, capsys):
    path = tmp_path / "surrogate.png"
    _png_with_text(path, '{"prompt": "a \\ud800 cove", "negative_prompt": "\\udfff"}')
    argv = ["--from-png", str(path), "--weights", str(tiny_weights), "--width", "512"]
    assert main([*argv, "--output", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --from-png {path}: ")
    assert "prompt must be valid Unicode text" in err and "'\\ud800' at position 2" in err
    assert "negative_prompt must be valid Unicode text" in err and "at position 0" in err


# --- --output: refused before any work, and a failed write told in one line ------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda tmp: tmp / "folder.png", "is a folder"),
        (lambda tmp: tmp / "missing" / "pano.png", "/missing' does not exist"),
        (lambda tmp: tmp / "a-file" / "pano.png", "/a-file' does not exist"),
        (lambda tmp: Path("/sys/pano.png"), "cannot write in '/sys' (PermissionError: "),
    ],
    ids=["a folder", "a missing folder", "under a file", "unwritable"],
)
def test_a_bad_output_is_refused_before_any_work(where, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "a-file").write_text("")
    output = where(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(SyncDiffusionPipeline, "from_pretrained", no_work)
    with pytest.raises(SystemExit) as exit_:
        main(["--prompt", "a forest", "--output", str(output)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --output {str(output)!r}" in err and message in err
    assert "give a file name in a folder you can write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder.png"]


def test_a_write_that_fails_at_the_end_is_one_line_and_leaves_nothing(tiny_weights, tmp_path):
    """The panorama's write fails as on a full disk (here a file-size limit: EFBIG, as ENOSPC
    would): one line naming --output, no traceback, no half-written or temporary file."""

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "pano.png"
    args = ["--prompt", "a forest", "--output", str(out), "--weights", str(tiny_weights)]
    args += ["--width", "512", "--num-inference-steps", "1", "--sync-threshold", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "syncdiffusion", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_files,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: --output {str(out)!r}: the panorama could not be written (")
    assert "File too large" in last and "the same command makes it again" in last
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_is_an_option_saved_in_the_file_and_remade_from_it(tiny_weights, tmp_path):
    common = ["--weights", str(tiny_weights)]
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    made = ["--prompt", "a cove", "--width", "576", "--num-inference-steps", "2"]
    made += ["--sync-threshold", "0", "--scheduler", "KarrasDPM", "--output", str(first)]
    assert main([*made, *common]) == 0
    assert read_parameters(first)["scheduler"] == "KarrasDPM"
    assert main(["--from-png", str(first), "--output", str(again), *common]) == 0
    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


def test_a_scheduler_outside_the_list_is_refused_naming_it(tiny_weights, capsys):
    argv = ["--prompt", "a cove", "--scheduler", "Euler", "--weights", str(tiny_weights)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "scheduler must be one of DDIM, DPMSolverMultistep" in error and "got 'Euler'" in error


def test_a_lora_file_is_an_option_and_from_png_holds_it_to_its_hash(
    pipe, tiny_weights, tmp_path, capsys
):
    lora = make_lora({"unet": pipe.unet}, tmp_path / "style.safetensors", seed=7)
    common = ["--weights", str(tiny_weights)]
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    made = ["--prompt", "a cove", "--width", "576", "--num-inference-steps", "1"]
    made += ["--sync-threshold", "0", "--lora-weights", str(lora), "--lora-scale", "0.5"]
    assert main([*made, "--output", str(first), *common]) == 0
    saved = read_parameters(first)
    assert (saved["lora_weights"], saved["lora_scale"]) == (str(lora), 0.5)
    assert main(["--from-png", str(first), "--output", str(again), *common]) == 0
    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()
    # The file at that path is another LoRA now: refused, naming both hashes, before any work.
    make_lora({"unet": pipe.unet}, lora, seed=8)
    capsys.readouterr()
    assert main(["--from-png", str(first), "--output", str(again), *common]) == 2
    error = capsys.readouterr().err
    assert f"lora_weights {str(lora)!r} is not the LoRA {first} was made with" in error


def test_a_lora_that_is_no_file_or_hub_id_is_refused_naming_it(tiny_weights, capsys):
    argv = ["--prompt", "a cove", "--extra-lora", "no such file", "--weights", str(tiny_weights)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: extra_lora 'no such file' must be an https:// URL"), error
