"""Many panoramas: `python -m syncdiffusion.batch`, alone, under torchrun, killed and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncdiffusion.batch.__main__ import main
from syncdiffusion.batch.jobs import expand_grid, job_key, parse_seeds, parse_setting, read_jobs
from syncdiffusion.errors import InputError
from syncdiffusion.request.image_file import read_parameters
from syncdiffusion.testing.lora import make_lora

ROOT = Path(__file__).resolve().parents[1]
# Tiny and quick: one window, one step, one synced step.
SMALL = {"width": 512, "height": 512, "num_inference_steps": 1, "sync_threshold": 1}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def batch(*args: str, launcher: tuple[str, ...] = ("-m",), **popen) -> subprocess.Popen:
    # One thread in every process: torchrun gives each of its processes one, and the same
    # arithmetic everywhere makes the pictures bit for bit the same.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *launcher, "syncdiffusion.batch", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=900)
    return process.returncode, stderr


def images(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def index(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]


def test_seeds_and_settings_parse():
    assert parse_seeds("0-3,9") == [0, 1, 2, 3, 9]
    assert parse_setting("sync_weight=0,20") == ("sync_weight", [0.0, 20.0])
    assert parse_setting("loop_closure=true,false") == ("loop_closure", [True, False])
    assert parse_setting('negative_prompt=["a, b", ""]') == ("negative_prompt", ["a, b", ""])
    assert parse_setting("scheduler=DDIM,KarrasDPM") == ("scheduler", ["DDIM", "KarrasDPM"])
    with pytest.raises(InputError, match=r"one of prompt.*got .sync_wieght=1"):
        parse_setting("sync_wieght=1")
    with pytest.raises(InputError, match=r"--set stride: stride must be a multiple of 8 .*got 'x'"):
        parse_setting("stride=x")
    with pytest.raises(InputError, match="--seeds"):
        parse_seeds("a-b")


def test_grid_expands_as_documented(tmp_path, capsys):
    """Each prompt, then each combination of --set values (first slowest), then each seed; the
    command prints the same JOBS lines it would run."""
    expected = [
        {"prompt": p, "sync_weight": w, "width": 768, "seed": s}
        for p in ("a lake", "a town")
        for w in (0.0, 20.0)
        for s in (0, 1, 2)
    ]
    settings = [("sync_weight", [0.0, 20.0]), ("width", [768])]
    assert expand_grid(["a lake", "a town"], [0, 1, 2], settings) == expected
    assert expand_grid(["a lake"], None, []) == [{"prompt": "a lake"}]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# the paper's\na lake\n\na town\n")
    args = ["--prompts", str(prompts), "--seeds", "0-2", "--set", "sync_weight=0,20"]
    assert main([*args, "--set", "width=768", "--print-jobs"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == expected


def test_job_lines_and_keys(tmp_path):
    jobs = read_jobs(write_lines(tmp_path / "jobs.jsonl", [{"prompt": "a"}, "", "[1]", "{x"]))
    assert [(j.line, j.error is None) for j in jobs] == [(1, True), (3, False), (4, False)]
    assert "line 3 must be a JSON object; got list" in jobs[1].error
    request = {"prompt": "a", "seed": 1}
    assert job_key(request, "m") == job_key(dict(reversed(request.items())), "m")
    assert job_key(request, "m") != job_key(request, "other model")


def test_one_process_makes_each_job_once_and_records_bad_ones(tiny_weights, tmp_path):
    """A bad job is recorded with its message and the others are made, each file named by
    its job, with the CLI's parameters inside; a rerun makes nothing again."""
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "a lake", "seed": 1, **SMALL},
            {"prompt": "a lake", "seed": 1, **SMALL, "stride": 99},
            "not json",
            {"prompt": "a town", "seed": 2, **SMALL},
            {"prompt": "a lake", "seed": 1, **SMALL},  # the first again: the same file
        ],
    )
    out = tmp_path / "out"
    code, stderr = finish(batch(str(jobs), "--out", str(out), "--weights", str(tiny_weights)))
    assert code == 1, stderr
    assert "line 2: stride must be a multiple of 8" in stderr
    records = index(out)
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
    assert "stride must be" in records[1]["error"] and "not JSON" in records[2]["error"]
    assert records[0]["file"] == records[4]["file"] != records[3]["file"]
    assert records[0]["seconds"] > 0
    made = images(out)
    assert sorted(made) == sorted({records[0]["file"], records[3]["file"]})
    saved = read_parameters(out / records[3]["file"])
    assert saved["prompt"] == "a town" and saved["seed"] == 2 and saved["stride"] == 16
    assert "3 of 5 jobs made" in stderr
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    code, stderr = finish(batch(str(jobs), "--out", str(out), "--weights", str(tiny_weights)))
    assert "2 done already, 0 to make" in stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes


def test_torchrun_two_processes_make_the_same_files_as_one(tiny_weights, tmp_path):
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [{"prompt": f"a view {i}", "seed": i, **SMALL} for i in range(3)]
        + [{"prompt": "wide", "seed": 7, **SMALL, "width": 768, "stride": 32}],
    )
    common = ("--weights", str(tiny_weights), "--device", "cpu", "--progress-every", "0.2")
    one, two = tmp_path / "one", tmp_path / "two"
    code, stderr = finish(batch(str(jobs), "--out", str(one), *common))
    assert code == 0, stderr
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    code, stderr = finish(batch(str(jobs), "--out", str(two), *common, launcher=(*torchrun, "-m")))
    assert code == 0, stderr
    assert "on 2 processes" in stderr and "4/4 jobs done" in stderr
    assert images(one) == images(two) and len(images(one)) == 4
    # Both processes made some, and the main process merged their index parts.
    assert sorted(p.name for p in (two / ".index").iterdir()) == ["0.jsonl", "1.jsonl"]
    assert [r["file"] for r in index(one)] == [r["file"] for r in index(two)]


def test_a_killed_run_restarted_makes_only_what_is_missing(tiny_weights, tmp_path):
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [{"prompt": "a hill", "seed": i, **SMALL} for i in range(8)],
    )
    out = tmp_path / "out"
    args = (str(jobs), "--out", str(out), "--weights", str(tiny_weights))
    first = batch(*args, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(out.glob("*.png")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert 1 <= len(survivors) < 8
    code, stderr = finish(batch(*args))
    assert code == 0, stderr
    assert f"{len(survivors)} done already, {8 - len(survivors)} to make" in stderr
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert len(after) == 8 and {n: after[n] for n in survivors} == survivors
    assert not list(out.glob(".*.tmp"))  # the killed run's half-written file is gone
    assert all("file" in r for r in index(out))


def test_bad_lines_are_each_recorded_and_the_other_jobs_run(tiny_weights, tmp_path):
    """No line stops the batch: each bad one is recorded with its line number, what is wrong
    and what is allowed, and the good ones are made."""
    good = [{"prompt": "a lake", "seed": 1, **SMALL}, {"prompt": "a town", "seed": 2, **SMALL}]
    small = json.dumps(SMALL)[1:-1]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(
        b"\n".join(
            [
                json.dumps(good[0]).encode(),
                b'{"self": 1}',  # a name the pipeline's own method takes
                b'{"prompt": "\\ud800", ' + small.encode() + b"}",  # a lone surrogate
                b"[" * 100_000,  # deeper than Python's stack
                b'{"prompt": "caf\xff", ' + small.encode() + b"}",  # a byte that is not UTF-8
                b"\xff",
                json.dumps(good[1]).encode(),
            ]
        )
        + b"\n"
    )
    out = tmp_path / "out"
    code, stderr = finish(batch(str(jobs), "--out", str(out), "--weights", str(tiny_weights)))
    assert code == 1, stderr
    assert "Traceback" not in stderr and "2 of 7 jobs made" in stderr
    records = index(out)
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert "file" in records[0] and "file" in records[6]
    errors = [r.get("error", "") for r in records]
    assert errors[1].startswith("line 2: unknown input 'self'; the inputs are prompt, ")
    assert errors[2].startswith("line 3: prompt must be valid Unicode text")
    assert "'\\ud800' at position 0" in errors[2]
    assert errors[3].startswith("line 4 is not JSON (nested too deeply)")
    assert "each line of JOBS must be a JSON object" in errors[3]
    assert errors[4].startswith("line 5: prompt must be valid Unicode text")
    assert "'\\udcff' at position 3" in errors[4]
    assert errors[5].startswith("line 6 is not JSON (")
    assert len(images(out)) == 2


def test_a_prompts_line_that_is_not_utf8_is_that_jobs_error(tiny_weights, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9 terrace\na hill\n")
    grid = ["--prompts", str(prompts), "--seeds", "3"]
    grid += [f"--set={name}={value}" for name, value in SMALL.items()]
    assert main([*grid, "--print-jobs"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [job["prompt"] for job in printed] == ["caf\udce9 terrace", "a hill"]
    out = tmp_path / "out"
    code, stderr = finish(batch(*grid, "--out", str(out), "--weights", str(tiny_weights)))
    assert code == 1, stderr
    assert "Traceback" not in stderr and "1 of 2 jobs made" in stderr
    first, second = index(out)
    assert first["error"].startswith("line 1: prompt must be valid Unicode text")
    assert "'\\udce9' at position 3" in first["error"] and "file" in second


def test_out_naming_a_file_is_refused_in_one_line(tmp_path, capsys):
    jobs = write_lines(tmp_path / "jobs.jsonl", [{"prompt": "a"}])
    taken = tmp_path / "taken"
    taken.write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main([str(jobs), "--out", str(taken)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: --out {taken} is a file, not a folder: give a folder for the files and index "
        "(made if missing)\n"
    )
    assert taken.read_text() == "mine"


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tiny_weights, tmp_path):
    """Two real processes on one --out: the second refuses at once, naming --out and the run
    that holds it, and writes nothing; the first makes each job once. A lock left by a run
    that has ended does not stop the next."""
    jobs = write_lines(
        tmp_path / "jobs.jsonl", [{"prompt": "a dune", "seed": i, **SMALL} for i in range(2)]
    )
    out = tmp_path / "out"
    args = (str(jobs), "--out", str(out), "--weights", str(tiny_weights))
    first = batch(*args)
    lock = out / ".lock"
    holds = f"pid {first.pid} on "
    while first.poll() is None and not (lock.is_file() and holds in lock.read_text()):
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended without saying it holds the folder"
    # Stopped while it holds the folder, so the second surely comes while the first runs.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        code, stderr = finish(batch(*args))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert code == 2, stderr
    assert f"error: --out {out} is in use by another batch run ({holds}" in stderr
    assert "or give another --out" in stderr and "Traceback" not in stderr
    code, stderr = finish(first)
    assert code == 0, stderr
    assert "2 of 2 jobs made" in stderr and len(images(out)) == 2
    assert [len(part.read_text().splitlines()) for part in (out / ".index").iterdir()] == [2]
    assert not list(out.glob(".*.tmp"))
    code, stderr = finish(batch(*args))  # the lock file still names the first, which has ended
    assert code == 0 and "2 done already, 0 to make" in stderr, stderr


def test_out_that_cannot_be_written_is_refused_in_one_line(tmp_path, capsys):
    jobs = write_lines(tmp_path / "jobs.jsonl", [{"prompt": "a"}])
    with pytest.raises(SystemExit) as exit_:
        main([str(jobs), "--out", "/sys"])  # a folder even root cannot write in
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out /sys cannot be made or written (PermissionError: ")
    assert err.endswith(": give a folder for the files and index (made if missing)\n")
    assert err.count("\n") == 1


def test_jobs_with_loras_and_a_bad_one_recorded(pipe, tiny_weights, tmp_path):
    lora = make_lora({"unet": pipe.unet}, tmp_path / "style.safetensors")
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "a lake", **SMALL, "lora_weights": str(lora), "lora_scale": 0.5},
            {"prompt": "a lake", **SMALL, "lora_weights": str(tmp_path / "absent.safetensors")},
        ],
    )
    out = tmp_path / "out"
    code, stderr = finish(batch(str(jobs), "--out", str(out), "--weights", str(tiny_weights)))
    assert code == 1, stderr
    made, refused = index(out)
    saved = read_parameters(out / made["file"])
    assert (saved["lora_weights"], saved["lora_scale"]) == (str(lora), 0.5)
    assert refused["error"].startswith("line 2: InputError: lora_weights "), refused
    assert "no such file" in refused["error"]


def test_jobs_from_image_files_by_path_and_a_missing_one_recorded(tiny_weights, tmp_path):
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (256, 256), (30, 120, 60)).save(tmp_path / "photos" / "field.png")
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "a field", **SMALL, "width": 768, "image": "photos/field.png"}
            | {"prompt_strength": 1},  # from noise around the photo: one step runs
            {"prompt": "a field", **SMALL, "image": "photos/absent.png"},
        ],
    )
    out = tmp_path / "out"
    code, stderr = finish(batch(str(jobs), "--out", str(out), "--weights", str(tiny_weights)))
    assert code == 1, stderr
    made, refused = index(out)
    saved = read_parameters(out / made["file"])
    assert (saved["image"]["width"], saved["image"]["height"]) == (256, 256)
    assert refused["error"].startswith("line 2: image "), refused
