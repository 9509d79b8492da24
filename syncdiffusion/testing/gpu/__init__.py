"""The GPU check's parts, which `scripts/gpu_check.py` puts together and `tests/test_gpu.py` tests:

- `sections`: what each section measures (its settings in, its figures out), and `measure`,
  which runs the chosen sections once, in order, on one set of loaded pipelines;
- `budget`: what each section costs by the estimate for an H100-class GPU, and fitting the
  sections to a budget;
- `report`: the one report, DIR/gpu-check.md and DIR/gpu-check.json;
- `plugin`: gpu_check's view into `pytest -m gpu` (the figures it measured, for the tests to
  read; each test's outcome, for the report).

Nothing is imported here, so that `tests/conftest.py` can read `plugin` without the networks.
"""
