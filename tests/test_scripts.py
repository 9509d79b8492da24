"""Every script starts as a user runs it, importing the package without editing sys.path."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "script", ["benchmark.py", "demo_costs.py", "evaluate.py", "gpu_check.py", "demo.py"]
)
def test_the_script_starts(script, run_script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
