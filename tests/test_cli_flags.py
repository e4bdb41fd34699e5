"""The `offsite` command's flags come from the config dataclasses: the same flags as before, their defaults the fields'."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from offsite.cli import _build_parser, _demo_config, _demo_distill, _options, _vision_config, from_args
from offsite.config import COMPRESSIONS, DistillConfig, EvalConfig, SplitConfig, TrainConfig
from offsite.emulator.compress import COMPRESSIONS as REGISTERED
from offsite.studies.bench.settings import BenchConfig
from offsite.studies.settings import DISTILL_BUDGETS, VISION_DISTILL, AblateConfig, DemoConfig, VisionDemoConfig

COMMON = "--allocator --debug --quiet"
SPLIT = "--bottom --top --emulator-layers --drop-ratio --emulator-method --rank-fraction --calibration"
DISTILL = ("--distill --distill-steps --distill-lr --distill-batch-size --distill-seq-len --distill-eval-every "
           "--kd-weight --lm-weight --align --kd-normalise --distill-select --kl-weight "  # the last 3: new (fidelity)
           "--distill-heldout")
# The long flags of every command as of 0.1.1, before the flags came from the config fields.
FLAGS = {
    "emulate": f"--output --overwrite {SPLIT} {DISTILL} --sign --device --dtype "  # --sign, --trust, --bundle: new in the hardening
               "--no-stream --max-shard-size --num-processes --shard-full-model",  # new (scale)
    "tune": "--data --output --eval-data --lora-rank --lora-alpha --epochs --max-steps --lr --weight-decay "
            "--warmup-ratio --batch-size --grad-accum --seq-len --eval-every --seed --cache-emulator "
            "--checkpoint-emulator --overwrite --checkpoint-every --trust --sign --init-adapter --patience "
            "--device --dtype --save-dtype --num-processes "  # the last 4: new (scale)
            "--proximal-mu "  # new (federation)
            "--head-lr-scale",  # new (encoders)
    "align": f"--model --adapter --output {DISTILL} --trust --sign --overwrite --device --dtype --num-processes --shard-full-model",  # new in the fidelity work
    "federate": "--output --client-data --rounds --local-steps --strategy --server-lr --secagg --dp-noise --dp-clip "
                "--dp-delta "
                "--eval-data --model --eval-limit --lora-rank --lora-alpha --lr --weight-decay --warmup-ratio "
                "--batch-size --grad-accum --seq-len --seed --checkpoint-emulator --proximal-mu --min-clients "
                f"--client-cpus --round-timeout --overwrite --device --dtype --write-app {DISTILL}",  # new (federation)
    "plug": "--output --overwrite --bundle --trust --no-stream --max-shard-size",
    "eval": "--data --adapter --bundle --seq-len --batch-size --limit --json --device --dtype "
            "--batch-tokens --device-map --max-memory "  # these 3: new (scale)
            "--lm-eval --lm-eval-output",  # new (lm-eval bridge)
    "info": "--json",
    "demo-vision": f"--model --out {SPLIT} --task --quick {DISTILL} --no-distill --seed --lr --weight-decay "
                   "--head-lr-scale --device --dtype",  # new (encoders)
    "demo": f"--model --out {SPLIT} --tasks --quick {DISTILL} --no-distill --seed --lr --lora-rank --weight-decay "
            "--compare-uniform --fair-budget --device --dtype --lm-eval --lm-eval-limit",  # the last 2: new (lm-eval)
    "ablate": f"--model --task --methods --out --bottom --top --emulator-layers --rank-fraction --calibration "
              f"{DISTILL} --quick --seed --device --dtype",
    "bench": f"--random-shape --task {SPLIT} --batch-size --seq-len --steps "
             "--warmup-steps --lora-rank --epochs --settings --eval-examples --threads --in-process --json "
             "--device --dtype",
    "setup-assets": "--vision",  # new (encoders)
    "keygen": "--overwrite",
}


def subparser(command: str) -> argparse.ArgumentParser:
    action = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_command_keeps_its_flags(command):
    expected = set(f"{FLAGS[command]} {COMMON}".split())
    if command in ("emulate", "demo", "demo-vision", "bench"):
        expected.add("--method")  # the alias of --emulator-method
    assert long_flags(subparser(command)) == expected


def parse(*argv: str) -> argparse.Namespace:
    return _build_parser().parse_args(list(argv))


def test_defaults_are_the_config_fields():
    assert from_args(TrainConfig, parse("tune", "b", "--data", "d", "-o", "o")) == TrainConfig()
    assert from_args(EvalConfig, parse("eval", "m", "--data", "d")) == EvalConfig(model="m", data="d")
    emulate = parse("emulate", "m", "-o", "o", "--distill", "austen")
    assert from_args(SplitConfig, emulate) == SplitConfig()
    assert from_args(DistillConfig, emulate) == DistillConfig(corpus="austen")
    ablate = parse("ablate")
    assert from_args(AblateConfig, ablate, distill=from_args(DistillConfig, ablate)) == AblateConfig()
    bench = parse("bench", "m")
    assert from_args(BenchConfig, bench, split=from_args(SplitConfig, bench)) == BenchConfig(model="m")


def test_the_demo_without_flags_is_the_default_demo():
    """Its stage caches stay valid: no adapter override appears that was not asked for (the demo's --seed too)."""
    assert _demo_config(parse("demo")) == DemoConfig()
    assert _demo_config(parse("demo", "--seed", "3", "--lr", "3e-4")).adapter_training == {"lr": 3e-4}


def test_the_vision_demo_without_flags_is_the_default_one():
    assert _vision_config(parse("demo-vision")) == VisionDemoConfig()
    quick = _vision_config(parse("demo-vision", "--quick", "--distill-steps", "9", "--head-lr-scale", "3"))
    assert quick.distill == dataclasses.replace(VISION_DISTILL["quick"], steps=9)
    assert quick.adapter_training == {"head_lr_scale": 3.0}


def test_demo_distillation_is_the_budget_unless_a_flag_says_otherwise():
    assert _demo_distill(parse("demo")) == "budget"
    assert _demo_distill(parse("demo", "--no-distill")) is None
    # a flag replaces only its own field: the quick budget's short windows stay
    quick = _demo_distill(parse("demo", "--quick", "--kd-weight", "30"))
    assert quick == dataclasses.replace(DISTILL_BUDGETS["quick"], kd_weight=30.0)
    assert _demo_distill(parse("demo", "--distill", "my.txt")).corpus == "my.txt"


def test_every_option_has_help_and_a_single_default():
    for cls in (SplitConfig, DistillConfig, TrainConfig, EvalConfig, AblateConfig, BenchConfig):
        for field in _options(cls):
            assert field.metadata["help"], f"{cls.__name__}.{field.name} has no help"


def test_config_names_the_registered_compressions():
    assert set(COMPRESSIONS) == set(REGISTERED)


def test_help_shows_each_default_once_from_the_field():
    text = " ".join(subparser("tune").format_help().split())
    assert "peak learning rate (default 0.0001)" in text and "AdamW weight decay (default 0.0)" in text
    assert "LoRA alpha (default 2 x rank)" in text  # a help that explains its default is left as it is
    demo = " ".join(subparser("demo").format_help().split())
    assert "--kd-weight KD_WEIGHT weight of the normalised MSE to the full block (default: the budget's)" in demo


def test_the_command_starts_without_torch():
    """`offsite --help` and the allocator's restart stay fast: building the parser loads no torch."""
    code = ("import sys, offsite.cli; offsite.cli._build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
