"""scripts/reproduce_paper.py's requests and table (the run itself is batch's, tested there)."""

from __future__ import annotations

from pathlib import Path

from syncdiffusion.batch.jobs import read_prompts
from syncdiffusion.cli.paper import COLUMNS, markdown, paper_jobs, spread
from syncdiffusion.request.inputs import panorama_request

ROOT = Path(__file__).resolve().parents[1]


def test_the_paper_jobs_are_valid_requests_with_the_same_seeds_for_both_methods():
    prompts = read_prompts(ROOT / "scripts" / "paper_prompts.txt")
    assert prompts and all(not p.startswith("#") for p in prompts)
    jobs = paper_jobs(prompts, per_prompt=3, references=2)
    assert {len(jobs["multidiffusion"]), len(jobs["syncdiffusion"])} == {3 * len(prompts)}
    assert len(jobs["reference"]) == 2 * len(prompts)
    for folder in jobs.values():
        for inputs in folder:
            panorama_request(inputs)  # raises if any is not a request SD2-base takes
    multi, sync = jobs["multidiffusion"], jobs["syncdiffusion"]
    assert {j["sync_weight"] for j in multi} == {0.0} and {j["sync_weight"] for j in sync} == {20}
    assert [(j["prompt"], j["seed"]) for j in multi] == [(j["prompt"], j["seed"]) for j in sync]
    assert {(j["width"], j["height"]) for j in multi} == {(3072, 512)}
    assert {(j["width"], j["height"]) for j in jobs["reference"]} == {(512, 512)}


def test_the_table_has_the_papers_columns_as_mean_and_std():
    row = {column: spread([1.0, 3.0]) for column in COLUMNS}
    row["clip_score"] = spread([None])
    text = markdown({"multidiffusion": row, "syncdiffusion": row})
    header, _rule, multi, sync = text.splitlines()
    assert header.count("|") == len(COLUMNS) + 2 and "Mean-GIQA" in header and "KID" in header
    assert multi.startswith("| MultiDiffusion | 2.0000 ± 1.0000 |") and multi.endswith("| – |")
    assert sync.startswith("| SyncDiffusion |")
