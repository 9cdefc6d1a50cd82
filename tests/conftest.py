import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_datasets() -> Path | None:
    """The real datasets for integration checks: $ECAVG_SHARED_DATA or ../shared/datasets beside the repo."""
    for candidate in (os.environ.get("ECAVG_SHARED_DATA"), REPO_ROOT.parent / "shared" / "datasets"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def shared_datasets() -> Path:
    root = find_shared_datasets()
    if root is None:
        pytest.skip("shared datasets not found (set ECAVG_SHARED_DATA or provide ../shared/datasets)")
    return root


# -- property-based fuzzing (tests/test_fuzz_*.py) ------------------------------------------------------------
# "ci" (the default): a bounded budget with a fixed seed, so the fuzz tests are as repeatable as any other test.
# "fuzz" (HYPOTHESIS_PROFILE=fuzz, `make fuzz`): many more examples, fresh ones on every run.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a dev dependency; the fuzz tests skip without it
    pass
else:
    _FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None,
                              suppress_health_check=_FUZZ_HEALTH)
    settings.register_profile("fuzz", max_examples=2000, deadline=None, suppress_health_check=_FUZZ_HEALTH)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class FuzzTally:
    """How many inputs each fuzz target was given, and how they ended; printed at the end of the session.

    ``run`` classifies one call: "accepted" (it returned), "rejected" (it raised one of the allowed errors) or
    "escaped" (anything else, which is recorded and re-raised, so the test fails).
    """

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def run(self, target: str, call, allowed: type[BaseException] | tuple[type[BaseException], ...]):
        outcome = self.counts.setdefault(target, {"accepted": 0, "rejected": 0, "escaped": 0})
        try:
            result = call()
        except allowed:
            outcome["rejected"] += 1
            raise
        except Exception:
            outcome["escaped"] += 1
            raise
        outcome["accepted"] += 1
        return result


FUZZ_TALLY = FuzzTally()


@pytest.fixture(scope="session")
def fuzz_tally() -> FuzzTally:
    return FUZZ_TALLY


def pytest_terminal_summary(terminalreporter) -> None:
    if not FUZZ_TALLY.counts:
        return
    terminalreporter.section("fuzz inputs")
    for target, outcome in sorted(FUZZ_TALLY.counts.items()):
        tried = sum(outcome.values())
        terminalreporter.write_line(
            f"{target}: {tried} inputs tried, {outcome['accepted']} accepted, {outcome['rejected']} rejected "
            f"with the documented error, {outcome['escaped']} escaped"
        )
