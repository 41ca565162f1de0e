"""The memory planner (falkon_convrfm.planning): phase sizes and the largest centre count that
fits a device. The ``convrfm plan`` command that prints it is tested in test_cli.py."""
import warnings

import pytest

from falkon_convrfm.planning import plan_memory


def test_memory_plan_phases_and_largest_centre_count():
    plan = plan_memory(10_000, (3, 32, 32), 3, centres=2000, device_memory=64 * 2**30)
    assert plan["phases"]["K_nm (stored)"] == 10_000 * 2000 * 4
    assert plan["fits"] and plan["max_centres"] >= 2000
    tight = plan_memory(10_000, (3, 32, 32), 3, centres=2000, device_memory=plan["peak"] - 1)
    assert not tight["fits"] and tight["max_centres"] < 2000
    assert plan_memory(10_000, (3, 32, 32), 3, centres=tight["max_centres"],
                       device_memory=plan["peak"] - 1)["fits"]


def test_exact_solver_plan_has_every_row_as_a_centre():
    plan = plan_memory(3000, (3, 32, 32), 3, centres=500, solver="exact", device_memory=64 * 2**30)
    assert plan["centres"] == 3000 and plan["phases"]["Cholesky factor"] == 3000 * 3000 * 8
    assert plan["phases"]["K + float64 copy"] == 3000 * 3000 * (4 + 8)
    with pytest.warns(UserWarning, match="n_centres=500 is more than the 100 training rows: all 100 are centres"):
        assert plan_memory(100, (3, 32, 32), 3, centres=500)["centres"] == 100  # fit uses min(n_centres, n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_memory(100, (3, 32, 32), 3, centres=100)
        plan_memory(100, (3, 32, 32), 3, centres=500, solver="exact")  # the exact solver says nothing either


def test_machine_memory_is_positive_and_described():
    from falkon_convrfm.memory import machine_memory

    memory, source = machine_memory("cpu")
    assert memory > 0 and "CPU memory" in source
