import pytest

from offsite.config import EmulateConfig, SplitConfig, TrainConfig, TuneConfig
from offsite.errors import ConfigError


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0), "--lr=0 must be greater than 0"),
    (dict(batch_size=-2), "--batch-size=-2 must be greater than 0"),
    (dict(epochs=1, max_steps=3), "--epochs and --max-steps both given"),
    (dict(lora_alpha=8), "--lora-alpha needs --lora-rank"),
    (dict(warmup_ratio=1.5), "--warmup-ratio=1.5 must be in [0, 1)"),
    (dict(weight_decay=-1), "--weight-decay=-1 is negative"),
])
def test_bad_training_settings_name_the_flag(kwargs, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**kwargs)
    assert message in str(error.value)


def test_steps_from_epochs_or_max_steps():
    assert TrainConfig(batch_size=4, grad_accum=2).total_steps(20) == 3  # one epoch by default
    assert TrainConfig(batch_size=4, epochs=2.5).total_steps(20) == 13
    assert TrainConfig(max_steps=7).total_steps(20) == 7


def test_nested_configs_round_trip_through_json():
    tune = TuneConfig(bundle="b", data="d", output="o", train=TrainConfig(lr=3e-4, lora_rank=8))
    assert TuneConfig.from_dict(tune.to_dict()) == tune
    emulate = EmulateConfig(model="m", output="o", split=SplitConfig(bottom=1, emulator_layers=3))
    assert EmulateConfig.from_dict(emulate.to_dict()) == emulate
