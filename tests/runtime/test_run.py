"""The serving process freezes its start-up heap (in a subprocess: it would freeze the
test runner's too)."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import gc
from relate_smtp.runtime.run import freeze_startup_heap
before = gc.get_freeze_count()
freeze_startup_heap()
print(before, gc.get_freeze_count())
"""


def test_start_up_objects_leave_the_collectors_generations() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True, timeout=60
    )
    before, after = map(int, done.stdout.split())
    assert before == 0
    assert after > 10_000  # the modules and everything they built
