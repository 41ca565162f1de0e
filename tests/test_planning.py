"""The memory planner (falkon_convrfm.planning): phase sizes and the largest centre count that
fits a device. The ``convrfm plan`` command that prints it is tested in test_cli.py."""
from falkon_convrfm.planning import plan_memory


def test_memory_plan_phases_and_largest_centre_count():
    plan = plan_memory(10_000, (3, 32, 32), 3, centres=2000, device_memory=64 * 2**30)
    assert plan["phases"]["K_nm (stored)"] == 10_000 * 2000 * 4
    assert plan["fits"] and plan["max_centres"] >= 2000
    tight = plan_memory(10_000, (3, 32, 32), 3, centres=2000, device_memory=plan["peak"] - 1)
    assert not tight["fits"] and tight["max_centres"] < 2000
    assert plan_memory(10_000, (3, 32, 32), 3, centres=tight["max_centres"],
                       device_memory=plan["peak"] - 1)["fits"]
