"""Everything that needs a GPU, in one command: fp16 numerics, speed, memory, out-of-memory.

    python scripts/gpu_check.py [--out DIR]           # CUDA: SD2-base architecture, random
    python scripts/gpu_check.py --smoke [--out DIR]   # the CPU, the tiny model, small sizes

Before anything runs it prints each selected section's estimated seconds on an H100-class GPU,
from the work its settings ask for; where the total is over `--budget` (8 minutes, so that the
whole check fits a 10-minute slot on a borrowed GPU) the heaviest sections run fewer unsynced
steps, and where that is not enough the check refuses to start (exit 2). Optional sections
(`budget.DROPPABLE`: schedulers, lora) are left out first where the whole does not fit; `--only`
runs them all the same. Then it measures the sections (syncdiffusion/testing/gpu/sections.py
says what each measures: the published algorithm and the authors' SyncControlNet against the
fast path, repeatability, the fp16 sync gradient, the memory estimate, out-of-memory, a huge
panorama under a 24 GiB cap, DDIM at 50 steps against KarrasDPM at 25, a step with LoRAs fused
against one without, SDXL), each once, each even where an earlier one failed (its error goes
into the report); `--only SECTION` reruns one. Then `pytest -m gpu` (tests/test_gpu.py) tests
the claims on those figures, in this process, without measuring again.

Writes DIR/gpu-check.md (the report that goes into BENCHMARKS.md) and DIR/gpu-check.json (its
figures) after every section, with its wall time beside its estimate and each run's loss-scale
back-offs, so a run cut short still leaves what it measured; then each test's outcome, then the
time table. Exits 1 where a test failed or did not run (the report is whole all the same).

The GPU machine needs this project's pinned diffusers, transformers and lpips:
`scripts/fetch_gpu_wheels.sh` downloads them into `.whl/` to take along.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from syncdiffusion import __version__
from syncdiffusion.testing.gpu import budget, report, sections
from syncdiffusion.testing.measure import machine

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "test_gpu.py"


def run_tests(figures: dict[str, dict]) -> dict[str, dict]:
    """`pytest -m gpu` over `figures` (only the tests of their sections): each test's section,
    outcome and message."""
    try:
        import pytest

        from syncdiffusion.testing.gpu.plugin import Outcomes
    except ImportError as error:  # the figures are measured and kept all the same
        return {"pytest": {"section": None, "outcome": "not run", "message": str(error)}}
    plugin = Outcomes(figures)
    args = [str(TESTS), "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    code = pytest.main([*args, "-W", "ignore::pytest.PytestAssertRewriteWarning"], plugins=[plugin])
    if code != 0 and not any(failed(test) for test in plugin.outcomes.values()):
        message = f"pytest exited {code!s} (a collection or usage error: see its output)"
        plugin.outcomes["pytest"] = {"section": None, "outcome": "error", "message": message}
    return plugin.outcomes


def failed(test: dict) -> bool:
    return test["outcome"] in ("failed", "error", "not run")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--smoke", action="store_true", help="the CPU and the tiny model")
    parser.add_argument(
        "--tiny-weights",
        type=Path,
        default=ROOT / ".tiny-weights",
        help="the tiny model's folder for --smoke, written there if missing",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sections.SECTIONS,
        help="run this section alone (repeatable); memory runs with out-of-memory",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=budget.BUDGET_SECONDS,
        help="seconds the sections may take by the estimate for an H100-class GPU; optional "
        "sections not asked for with --only are left out, then the heaviest run fewer unsynced "
        f"steps to fit (default {budget.BUDGET_SECONDS:.0f})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    wanted = sections.selected(args.only or sections.SECTIONS)
    mode = "smoke" if args.smoke else "gpu"
    # Sections asked for by name are not left out to fit.
    droppable = () if args.only else budget.DROPPABLE
    plan = budget.plan(sections.SETTINGS[mode], wanted, args.smoke, args.budget, droppable)
    total = budget.total_seconds(plan.works)
    dropped = ", ".join(plan.dropped) + (" (run with --only)" if plan.dropped else "")
    print(
        "Estimated seconds on an H100-class GPU"
        + (" (at --smoke's sizes; this run is on the CPU)" if args.smoke else "")
        + ":",
        *budget.estimate_table(plan.works, args.budget),
        *(["Left out to fit the budget: " + dropped] if dropped else []),
        *(["Shrunk to fit the budget: " + "; ".join(plan.shrinks)] if plan.shrinks else []),
        sep="\n",
        flush=True,
    )
    if total > args.budget:
        print(
            f"error: the sections are estimated at {total:.0f} s, over the budget of "
            f"{args.budget:.0f} s even with their unsynced steps cut; run fewer with --only, or "
            "give a larger --budget",
            file=sys.stderr,
        )
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --smoke runs the same checks on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    if not args.smoke:  # with its index: set_per_process_memory_fraction wants one
        device = torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    flag = " --smoke" if args.smoke else ""
    out = report.Report(
        args.out,
        [
            f"### {datetime.date.today().isoformat()} · gpu_check{flag}",
            "",
            f"- Machine: {machine(device)}",
            f"- Model: {'tiny' if args.smoke else 'SD2-base architecture'}, random weights; "
            f"syncdiffusion {__version__}",
            "- Command: `python scripts/gpu_check.py " + " ".join(argv or sys.argv[1:]) + "`",
            f"- Estimate: {total:.0f} s on an H100-class GPU, budget {args.budget:.0f} s"
            + "".join(f"; {shrink}" for shrink in plan.shrinks)
            + (f"; left out: {dropped}" if dropped else ""),
            "",
        ],
    )
    tiny = args.tiny_weights if args.smoke else None
    figures = {}
    for name, measured, seconds in sections.measure(plan.settings, plan.wanted, device, tiny):
        figures[name] = measured
        out.section(name, measured, seconds, plan.works[name].seconds)
    outcomes = run_tests(figures)
    out.add("tests", *report.outcome_table(outcomes))
    out.add("total", *report.time_table(out.figures, plan.works, time.perf_counter() - started))
    return int(any(failed(test) for test in outcomes.values()))


if __name__ == "__main__":
    sys.exit(main())
