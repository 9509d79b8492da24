"""`pytest -m gpu` as gpu_check.py runs it, in its own process, after measuring the sections:
the tests read the figures it measured rather than measure again, only the tests of the
sections it ran are selected, and each test's outcome comes back for the report."""

from __future__ import annotations

import pytest

# Where the tests find figures already measured: the stash of pytest's config.
FIGURES = pytest.StashKey[dict]()


def section_of(item: pytest.Item) -> str | None:
    """The section a test is about: its `gpu` marker's argument."""
    marker = item.get_closest_marker("gpu")
    return marker.args[0] if marker is not None and marker.args else None


class Outcomes:
    """A pytest plugin: `figures` (section -> figures) for the tests, and `outcomes` (test id ->
    its section, outcome and message) once they have run."""

    def __init__(self, figures: dict[str, dict]) -> None:
        self.figures, self.outcomes = figures, {}

    def pytest_configure(self, config: pytest.Config) -> None:
        config.stash[FIGURES] = self.figures

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list) -> None:
        dropped = [item for item in items if section_of(item) not in self.figures]
        if dropped:
            items[:] = [item for item in items if item not in dropped]
            config.hook.pytest_deselected(items=dropped)
        for item in items:
            self.outcomes[item.nodeid] = {
                "section": section_of(item),
                "outcome": "not run",
                "message": "",
            }

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # The call's outcome; a setup or teardown only where it did not pass.
        if report.when != "call" and report.passed:
            return
        outcome = report.outcome if report.when == "call" or report.skipped else "error"
        self.outcomes.setdefault(report.nodeid, {"section": None})
        self.outcomes[report.nodeid] |= {"outcome": outcome, "message": message(report)}


def message(report: pytest.TestReport) -> str:
    """What a test that did not pass said: its assertion or error, or its reason to skip."""
    if report.passed:
        return ""
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message if crash is not None else str(report.longrepr).strip().split("\n")[-1]
