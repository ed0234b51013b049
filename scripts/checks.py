"""The PASS/FAIL bookkeeping shared by the GPU check scripts (no GPU needed to import).

Example::

    from checks import RESULTS, check, verdict

    @check("two plus two")
    def _():
        assert 2 + 2 == 4      # runs now; prints PASS (or FAIL with the traceback)

    sys.exit(verdict())
"""

from __future__ import annotations

import time
import traceback

RESULTS: list = []


def check(name: str):
    """Run the decorated function at once as one check; its return value is printed as detail."""
    def wrap(fn):
        start = time.monotonic()
        try:
            detail = fn()
            RESULTS.append(True)
            print(f"PASS {name} ({time.monotonic() - start:.2f}s) {detail or ''}", flush=True)
        except Exception:
            RESULTS.append(False)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        return fn
    return wrap


def verdict() -> int:
    """Print the tally; the exit status (0 when every check passed)."""
    print(f"{sum(RESULTS)} passed, {len(RESULTS) - sum(RESULTS)} failed")
    return 0 if all(RESULTS) else 1
