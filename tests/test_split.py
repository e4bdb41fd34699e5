import pytest

from offsite.config import SplitConfig
from offsite.emulator.split import plan_split, uniform_indices
from offsite.errors import ConfigError


def test_uniform_keeps_both_ends_and_spreads_evenly():
    assert uniform_indices(26, 8) == [0, 4, 7, 11, 14, 18, 21, 25]
    assert uniform_indices(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_indices(7, 1) == [0]
    assert uniform_indices(4, 2) == [0, 3]


def test_plan_2_8_2_on_30_layers():
    plan = plan_split(30, SplitConfig(bottom=2, top=2, emulator_layers=8))
    assert plan.bottom == (0, 1)
    assert plan.top == (28, 29)
    assert plan.emulator == (2, 6, 9, 13, 16, 20, 23, 27)
    assert plan.adapter == (0, 1, 28, 29)
    assert [role for _, role in plan.roles()][:3] == ["adapter_bottom", "adapter_bottom", "emulator"]


def test_drop_ratio_and_the_default_split_never_keep_the_whole_middle():
    assert len(plan_split(30, SplitConfig(drop_ratio=0.5)).emulator) == 13
    # No flag: the measured default, 30% of the middle (2-8-2 on the built-in model), scaling with depth.
    assert plan_split(30, SplitConfig()) == plan_split(30, SplitConfig(emulator_layers=8))
    assert len(plan_split(24, SplitConfig()).emulator) == 6 and len(plan_split(48, SplitConfig()).emulator) == 14
    assert not plan_split(30, SplitConfig()).keeps_whole_middle
    # Keeping every middle layer is possible, but only when asked for.
    assert plan_split(30, SplitConfig(emulator_layers=26)).keeps_whole_middle
    assert plan_split(30, SplitConfig(drop_ratio=0.0)).emulator == tuple(range(2, 28))


def test_no_compression_is_allowed():
    assert plan_split(10, SplitConfig(emulator_layers=6)).kept == tuple(range(10))


@pytest.mark.parametrize("kwargs, words", [
    (dict(emulator_layers=27), ["--emulator-layers=27", "1 to 26"]),
    (dict(bottom=15, top=15), ["--bottom=15", "--top=15", "at most 29"]),
])
def test_impossible_plans_name_flag_value_and_range(kwargs, words):
    with pytest.raises(ConfigError) as error:
        plan_split(30, SplitConfig(**kwargs))
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("kwargs, word", [
    (dict(bottom=-1), "--bottom=-1"),
    (dict(emulator_layers=0), "--emulator-layers=0"),
    (dict(drop_ratio=1.5), "--drop-ratio=1.5"),
    (dict(emulator_layers=3, drop_ratio=0.5), "only one"),
    (dict(bottom=0, top=0), "empty"),
    (dict(method="magic"), "--method='magic'"),
])
def test_bad_split_settings_are_refused(kwargs, word):
    with pytest.raises(ConfigError, match=None) as error:
        SplitConfig(**kwargs)
    assert word in str(error.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as error:
        SplitConfig(bottom=-1, top=-2)
    assert len(error.value.problems) == 2


def test_split_config_round_trips_through_json():
    split = SplitConfig(bottom=1, top=3, emulator_layers=4)
    assert SplitConfig.from_dict(split.to_dict()) == split
    with pytest.raises(ConfigError, match="unknown SplitConfig field 'colour'"):
        SplitConfig.from_dict({"colour": 1})
