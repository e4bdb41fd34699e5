"""`offsite tune` killed (kill -9) or stopped (SIGTERM) mid-run resumes, and ends with a bit-identical adapter."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_bundle import make_bundle
from tiny_models import SAMPLE_TEXT

from offsite import TrainConfig, TuneConfig, tune

STEPS = 300


def tune_argv(bundle, data, output):
    return [sys.executable, "-m", "offsite.cli", "tune", str(bundle), "--data", str(data), "-o", str(output),
            "--max-steps", str(STEPS), "--batch-size", "2", "--seq-len", "16", "--lr", "1e-3",
            "--eval-data", str(data), "--eval-every", "100", "--checkpoint-every", "5"]


def straight(bundle, data, output):
    settings = TrainConfig(max_steps=STEPS, batch_size=2, seq_len=16, lr=1e-3, eval_every=100)
    tune(TuneConfig(bundle=str(bundle), data=str(data), output=str(output), eval_data=str(data), train=settings,
                    checkpoint_every=5))
    return (output / "adapter.safetensors").read_bytes()


def interrupted(bundle, data, output, how: signal.Signals) -> int:
    """Start `offsite tune` in its own process, wait for a checkpoint past step 50, then signal it."""
    state = output.with_name(f".{output.name}.tune") / "state.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OFFSITE_ALLOCATOR": "system"}  # one thread, as the test process
    process = subprocess.Popen(tune_argv(bundle, data, output), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text() or "{}").get("step", 0) >= 50:
            break
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before it could be interrupted: {process.stderr.read()}"
    process.send_signal(how)
    process.wait(timeout=60)
    assert not output.exists()  # nothing half-written
    return json.loads(state.read_text())["step"]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_an_interrupted_tune_resumes_to_the_same_adapter(model_dirs, tmp_path, how):
    data = tmp_path / "train.txt"
    data.write_text(SAMPLE_TEXT)
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    expected = straight(bundle, data, tmp_path / "straight")
    stopped_at = interrupted(bundle, data, tmp_path / "adapter", how)
    assert 50 <= stopped_at < STEPS
    rerun = subprocess.run(tune_argv(bundle, data, tmp_path / "adapter"), capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "OFFSITE_ALLOCATOR": "system"})
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming training from step" in rerun.stderr
    assert (tmp_path / "adapter" / "adapter.safetensors").read_bytes() == expected
    assert not (tmp_path / ".adapter.tune").exists()  # removed once the adapter is written
    records = [json.loads(line) for line in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" not in r] == list(range(1, STEPS + 1))  # each step once
    assert [r["step"] for r in records if "eval" in r] == [100, 200, 300]


def test_a_float16_run_resumes_at_the_loss_scale_it_had_reached(tmp_path):
    import torch
    from offsite.training.resume import Resumable
    from offsite.training.trainer import Best
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    checkpoint = Resumable(tmp_path / "state", {"run": 1})
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    scaler.update(new_scale=512.0)  # as after overflows lowered it from 2**16
    checkpoint.save(7, model, optimizer, scheduler, Best(), metrics, scaler)
    fresh = torch.amp.GradScaler("cpu")
    assert checkpoint.resume(model, optimizer, scheduler, Best(), metrics, fresh) == 7
    assert fresh.get_scale() == 512.0
