"""Soak: many predictions in a row through the real Cog server; memory and time must not creep.

    python scripts/soak.py                    # 20 predictions on the tiny model, recorded
    python scripts/soak.py --count 5 --no-record

Prints the worker's RSS and the seconds of every prediction, checks that the RSS after the
last is within 10% of after the second and that the later predictions are no slower than
the early ones, and appends the figures to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

from syncdiffusion.models.tiny import make_tiny_weights
from syncdiffusion.testing.cog_server import CogServer, soak, verdict

ROOT = Path(__file__).resolve().parents[1]

INPUTS = {
    "prompt": "a lighthouse on a cliff",
    "width": 768,
    "height": 512,
    "num_inference_steps": 3,
    "sync_threshold": 1,
    "seed": 9,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights folder (default: a fresh tiny random model)",
    )
    parser.add_argument("--record", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.count < 4:
        parser.error("--count must be at least 4")

    with tempfile.TemporaryDirectory() as folder:
        weights = args.weights or make_tiny_weights(Path(folder) / "tiny")
        with CogServer(weights) as server:
            runs = soak(server, args.count)
    growth, drift = verdict(runs)
    ok = growth <= 0.10 and drift <= 1.10
    report = "\n".join(
        [
            f"### {datetime.date.today().isoformat()} · soak · {args.count} predictions",
            "",
            f"- Settings: {INPUTS}, through `python -m cog.server.http`",
            "- Command: `python scripts/soak.py " + " ".join(sys.argv[1:]) + "`",
            f"- Worker RSS after 2nd: {runs[1][1] / 2**20:.0f} MiB; after last: "
            f"{runs[-1][1] / 2**20:.0f} MiB ({growth:+.1%}; limit +10%)",
            f"- Seconds per prediction: first {runs[0][0]:.2f}, median "
            f"{statistics.median(s for s, _ in runs):.2f}, last {runs[-1][0]:.2f}; "
            f"late/early median {drift:.2f} (limit 1.10)",
            f"- Verdict: {'pass' if ok else 'FAIL'}",
            "",
        ]
    )
    print(report)
    if not args.no_record:
        with args.record.open("a") as f:
            f.write("\n" + report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
