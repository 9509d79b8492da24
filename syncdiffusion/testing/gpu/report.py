"""The GPU check's one report: DIR/gpu-check.md (what goes into BENCHMARKS.md) and
DIR/gpu-check.json (its figures), both rewritten after every section and after the tests, so a
run cut short still leaves what it measured."""

from __future__ import annotations

import json
from pathlib import Path

from .budget import Work, total_seconds

GIB = 2**30


class Report:
    """The figures (JSON) and the markdown report, both rewritten after every addition."""

    def __init__(self, out: Path, header: list[str]) -> None:
        self.out, self.header, self.lines, self.figures = out, header, [], {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, figures: dict, lines: list[str]) -> None:
        self.figures[section] = figures
        self.lines += [f"**{section}**", "", *lines, ""]
        self._write(lines)

    def section(self, name: str, figures: dict, seconds: float, estimated: float) -> None:
        """A section's figures, described, and its measured seconds beside its estimate."""
        figures = {**figures, "wall_seconds": seconds, "estimated_seconds": estimated}
        failed = figures.get("error")
        try:
            lines = [f"FAILED: {failed}"] if failed else DESCRIBE[name](figures)
        except (KeyError, TypeError, ValueError) as error:  # the figures are kept all the same
            lines = [f"(figures not described: {type(error).__name__}: {error})"]
        wall = f"Wall time {seconds:.1f} s (estimated {estimated:.0f} s on an H100-class GPU)."
        # What `recompute="auto"` chose for the sync backward, and why (`chunks.plan_sync_chunks`).
        chosen = [f"Sync backward: {reason}." for reason in figures.get("sync_backward", [])]
        self.add(name, figures, [*lines, "", *chosen, wall])

    def _write(self, new_lines: list[str]) -> None:
        print("\n".join(new_lines), flush=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.figures, indent=2) + "\n")
        (self.out / "gpu-check.md").write_text("\n".join([*self.header, *self.lines]))


def against_oracle(oracle_path: str, setting: str):
    """The description of a section of `sections.against_oracle`'s figures."""

    def describe(f: dict) -> list[str]:
        inputs = f["inputs"]
        return [
            f"{inputs['width']}x{inputs['height']}, {f['windows']} windows, "
            f"{inputs['num_inference_steps']} steps, sync_threshold {inputs['sync_threshold']}, "
            f"{setting}",
            "",
            "| path | seconds | speed-up | peak memory | latents finite | max pixel diff "
            "| loss-scale back-offs |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {oracle_path} (fp32 weights, autocast) | {f['oracle_seconds']:.1f} | 1.00x | "
            f"{f['oracle_peak_gib']:.2f} GiB | {f['oracle_latent_finite']} | | |",
            f"| fast ({f['fast_dtype']}) | {f['fast_seconds']:.1f} | {f['speed_up']:.2f}x | "
            f"{f['fast_peak_gib']:.2f} GiB | {f['fast_latents_finite']} | "
            f"{f['max_pixel_diff']}/255 | {f['fast_loss_scale_back_offs']} |",
        ]

    return describe


def repeatable(f: dict) -> list[str]:
    inputs = f["inputs"]
    return [
        f"{inputs['width']}x{inputs['height']}, {inputs['num_inference_steps']} steps: the "
        f"same call twice (chunks of {f['auto_chunk']}) differs by "
        f"{f['max_pixel_diff_same_chunks']}/255; chunks of 1 against it by "
        f"{f['max_pixel_diff_chunks_of_1']}/255. Loss-scale back-offs of the three: "
        f"{', '.join(map(str, f['loss_scale_back_offs']))}.",
    ]


def gradient(f: dict) -> list[str]:
    return [
        f"One 64x64 view at the first step, {f['fast_dtype']} networks against fp32: cosine "
        f"{f['cosine']:.5f} with the loss scale ({f['cosine_without_loss_scale']:.5f} without), "
        f"norm ratio {f['norm_ratio']:.4f}, zeros {f['zero_share']:.2%} "
        f"({f['zero_share_without_loss_scale']:.2%} without); loss-scale back-offs "
        f"{f['loss_scale_back_offs']}.",
    ]


def memory(f: dict) -> list[str]:
    inputs, estimate, kept = f["inputs"], f["window_bytes"], f["kept"]
    rows = [
        f"| {k} | {c['estimate'] / GIB:.2f} GiB | {c['measured'] / GIB:.2f} GiB | "
        f"{c['measured'] / c['estimate']:.2f} | {c['loss_scale_back_offs']} |"
        for k, c in f["chunks"].items()
    ]
    return [
        f"{inputs['width']}x{inputs['height']}, one synced step, recomputed. Estimate: one window "
        f"{estimate / GIB:.3f} GiB (saved-tensor count on a probe, scaled); measured: peak "
        "allocated over what was allocated before the call"
        + (" (on the CPU: peak RSS, not comparable)" if f["device"] == "cpu" else "")
        + ".",
        "",
        "| chunk | estimate | measured | measured / estimate | loss-scale back-offs |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f'One window kept whole (`recompute="never"`): estimate {kept["estimate"] / GIB:.2f} '
        f"GiB, measured {kept['measured'] / GIB:.2f} GiB.",
    ]


def out_of_memory(f: dict) -> list[str]:
    failure, back_offs = f["one_window_error"], f["loss_scale_back_offs"]
    return [
        f"Cap at {f['cap_windows']} windows: the chunk asked for, then the one that fitted per "
        f"step {f['chunks_under_cap']} (halved and succeeded: {f['halved_and_succeeded']}). "
        "Cap at 0.3 windows: "
        f"{'MemoryError: ' + failure if failure else 'NO ERROR (wrong)'}. Then a normal "
        f"prediction: finite {f['next_prediction_finite']}; free memory "
        f"{f['free_gib_before']:.2f} GiB before, {f['free_gib_after']:.2f} GiB after. "
        f"Loss-scale back-offs: {back_offs['under_cap']} under the cap, {back_offs['next']} "
        "in the next prediction.",
    ]


def huge(f: dict) -> list[str]:
    inputs = f["inputs"]
    within = f"within {f['cap_gib']:.0f} GiB: " if f["cap_gib"] is not None else ""
    outcome = (
        f"{f['seconds']:.1f} s, peak {f['peak_gib']:.2f} GiB, latents finite "
        f"{f['latents_finite']}, loss-scale back-offs {f['loss_scale_back_offs']}"
        if f["memory_error"] is None
        else f"MemoryError: {f['memory_error']}"
    )
    return [
        f"{inputs['width']}x{inputs['height']}, stride {inputs['stride']}, {f['windows']} "
        f"windows, {inputs['num_inference_steps']} steps, {within}{outcome}.",
    ]


def schedulers(f: dict) -> list[str]:
    """scripts/benchmark.py --schedulers' table (`bench.schedulers`), with each run's finite
    latents and loss-scale back-offs."""
    inputs = f["inputs"]
    rows = [
        f"| {r['scheduler']} | {r['steps']} | {inputs['sync_threshold']} | "
        f"{r['window_evaluations']} | {r['seconds']:.2f} | {r['speed_up']:.2f}x | "
        f"{r['peak_gib']:.2f} GiB | {r['latents_finite']} | {r['loss_scale_back_offs']} |"
        for r in f["runs"]
    ]
    return [
        f"{inputs['width']}x{inputs['height']}, stride {inputs['stride']}, {f['windows']} "
        f"windows, the fast path, latents only: the last run makes {f['evaluations_ratio']:.2f} "
        f"of the first's window evaluations, at {f['speed_up']:.2f}x its speed.",
        "",
        "| scheduler | steps | synced | window evaluations | seconds | speed-up | peak memory "
        "| latents finite | loss-scale back-offs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def lora(f: dict) -> list[str]:
    """scripts/benchmark.py --lora's table (`bench.loras`), with each run's finite latents, its
    latent's largest difference to none's and its loss-scale back-offs."""
    inputs = f["inputs"]
    rows = [
        f"| {r['loras']} | {r['seconds']:.2f} | {r['fuse_seconds']:.2f} | "
        f"{r['seconds_per_step']:.3f} | {r['per_step_ratio']:.3f} | {r['peak_gib']:.2f} GiB | "
        f"{r['latents_finite']} | {r['max_latent_diff_to_none']:.3g} | "
        f"{r['loss_scale_back_offs']} |"
        for r in f["runs"]
    ]
    return [
        f"{inputs['width']}x{inputs['height']}, stride {inputs['stride']}, {f['windows']} "
        f"windows, {inputs['num_inference_steps']} steps, sync_threshold "
        f"{inputs['sync_threshold']}, the fast path ({f['fast_dtype']}), latents only, random "
        f"LoRAs of rank {f['lora_rank']} on every attention projection, best of {f['repeats']}: "
        f"with two LoRAs fused a step takes {f['per_step_ratio']:.3f} of a step without. Every "
        f"UNet and text-encoder tensor afterwards its value before, to the bit: "
        f"{f['base_bit_identical']} ({f['base_tensors']} tensors).",
        "",
        "| LoRAs | seconds | of which fetch, fuse, restore | seconds per step "
        "| per step against none | peak memory | latents finite | max latent diff to none "
        "| loss-scale back-offs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def sdxl(f: dict) -> list[str]:
    inputs = f["inputs"]
    return [
        f"{f['model']}, {inputs['width']}x{inputs['height']}, stride {inputs['stride']}, "
        f"{f['windows']} windows of {f['window_pixels']} px, {inputs['num_inference_steps']} "
        f"steps, sync_threshold {inputs['sync_threshold']}: {f['seconds']:.1f} s, peak "
        f"{f['peak_gib']:.2f} GiB, latents finite {f['latents_finite']}, loss-scale back-offs "
        f"{f['loss_scale_back_offs']}.",
    ]


# Each section's figures in a few lines of markdown.
DESCRIBE = {
    "published": against_oracle("published", "stride 16, seed 2"),
    "repeatable": repeatable,
    "gradient": gradient,
    "controlnet": against_oracle("SyncControlNet", "a random edge map"),
    "memory": memory,
    "out-of-memory": out_of_memory,
    "huge": huge,
    "schedulers": schedulers,
    "lora": lora,
    "sdxl": sdxl,
}


def outcome_table(outcomes: dict[str, dict]) -> tuple[dict, list[str]]:
    """The tests' figures (each test's section, outcome and message) and their lines: a count,
    then a row for each test."""
    counts: dict[str, int] = {}
    for test in outcomes.values():
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    rows = [
        f"| {nodeid.rpartition('::')[2]} | {test['section']} | {test['outcome']} | "
        + test["message"].replace("|", "\\|").replace("\n", " ")[:300]
        + " |"
        for nodeid, test in outcomes.items()
    ]
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "no tests ran"
    return outcomes, [
        f"`pytest -m gpu` over these figures (tests/test_gpu.py): {summary}.",
        "",
        "| test | section | outcome | message |",
        "| --- | --- | --- | --- |",
        *rows,
    ]


def time_table(
    figures: dict[str, dict], estimated: dict[str, Work], seconds: float
) -> tuple[dict, list[str]]:
    """The whole run's figures and its table of measured seconds beside the estimates: what the
    first GPU run calibrates the estimate's constants with. Loading, the tests, and whatever
    else ran outside the sections, is the run's time less theirs."""
    measured = {
        name: figures[name]["wall_seconds"]
        for name in estimated
        if "wall_seconds" in figures.get(name, {})
    }
    rest = estimated.get("loading", Work()).seconds
    rows = [f"| loading and the rest | {rest:.0f} | {seconds - sum(measured.values()):.1f} |"]
    rows += [
        f"| {name} | {work.seconds:.0f} | "
        + (f"{measured[name]:.1f} |" if name in measured else "did not run |")
        for name, work in estimated.items()
        if name != "loading"
    ]
    total = total_seconds(estimated)
    return {"seconds": seconds, "estimated_seconds": total, "sections": measured}, [
        f"{seconds:.0f} s in all, against an estimate of {total:.0f} s on an H100-class GPU.",
        "",
        "| section | estimated seconds | measured seconds |",
        "| --- | --- | --- |",
        *rows,
        f"| total | {total:.0f} | {seconds:.1f} |",
    ]
