"""One descriptor budget for the whole process: inputs and the parts of sharded inputs.

What it must guarantee is end to end (a thousand inputs under a limit of 128 descriptors,
shards beyond the budget reopened per read: see test_combine_core and test_sharded); these
pin down the formula and the accounting those rely on.
"""

from __future__ import annotations

import subprocess
import sys

from wavg.storage.descriptors import PER_FILE, RESERVED, DescriptorBudget


def test_the_budget_is_the_open_files_limit_less_a_reserve_per_two_descriptors():
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
        "from wavg.storage.descriptors import open_files_limit; print(open_files_limit())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == (128 - RESERVED) // PER_FILE


def test_a_reservation_is_all_or_nothing_and_comes_back_on_release():
    budget = DescriptorBudget(5)
    assert budget.take(3)
    assert not budget.take(3)  # refused whole: nothing taken
    assert budget.take(2)
    assert not budget.take(1)
    budget.give_back(5)
    assert budget.take(5)
