"""On a CUDA GPU: tune, eval and distillation in bfloat16 there (skipped without one; `pytest -m gpu`).

The CPU tests (test_device.py) run the same code with a CPU placement; these check what only a
GPU shows: tensors really on the device, and the float32 adapter file that comes back.
"""

import pytest
import torch
from safetensors import safe_open
from test_bundle import make_bundle

from offsite import (DeviceConfig, DistillConfig, EmulateConfig, EvalConfig, SplitConfig, TrainConfig, TuneConfig,
                     emulate, evaluate, tune)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = DeviceConfig(device="cuda", dtype="bfloat16")


def test_tune_on_the_gpu_in_bfloat16_exports_float32_and_scores_like_the_cpu(model_dirs, sample_text_file, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = tune(TuneConfig(bundle=str(bundle), data=str(sample_text_file), output=str(tmp_path / "a"),
                              train=TrainConfig(max_steps=8, lr=3e-3, batch_size=4, seq_len=64), runtime=GPU))
    with safe_open(str(adapter / "adapter.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
    scores = {device: evaluate(EvalConfig(model=str(bundle), adapter=str(adapter), data=str(sample_text_file),
                                          seq_len=64, runtime=DeviceConfig(device=device, dtype="float32")))
              for device in ("cpu", "cuda")}
    assert abs(scores["cuda"]["perplexity"] / scores["cpu"]["perplexity"] - 1) < 1e-3


def test_distillation_on_the_gpu_writes_a_float32_bundle(model_dirs, sample_text_file, tmp_path):
    bundle = emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "b"),
                                   split=SplitConfig(emulator_layers=2), runtime=GPU,
                                   distill=DistillConfig(corpus=str(sample_text_file), steps=4, batch_size=2,
                                                         seq_len=32)))
    with safe_open(str(next(bundle.glob("*.safetensors"))), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
