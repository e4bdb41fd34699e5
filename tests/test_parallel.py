"""Data-parallel `tune` through accelerate's launcher, on CPUs (gloo): the same adapter as one process.

Two processes with per-process batch 2 must train what one process with batch 4 trains (same
seed, same global batches), to float rounding; a killed worker must fail the run, not hang it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import SAMPLE_TEXT

from offsite import EmulateConfig, SplitConfig, TrainConfig, TuneConfig, emulate, tune
from offsite.errors import OffsiteError
from offsite.exchange.adapter import load_adapter
from offsite.parallel import Processes

TUNE = ["--max-steps", "4", "--seq-len", "32", "--device", "cpu", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    (out / "train.txt").write_text(SAMPLE_TEXT * 3)
    (out / "valid.txt").write_text(SAMPLE_TEXT)
    return emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(out / "bundle"),
                                 split=SplitConfig(bottom=1, top=1, emulator_layers=2)))


def offsite(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "offsite.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_two_processes_train_the_adapter_one_process_trains(bundle, tmp_path):
    data, valid = bundle.parent / "train.txt", bundle.parent / "valid.txt"
    common = [str(bundle), "--data", str(data), "--eval-data", str(valid), "--eval-every", "2", *TUNE]
    one = offsite("tune", *common, "-o", str(tmp_path / "one"), "--batch-size", "4", "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    two = offsite("tune", *common, "-o", str(tmp_path / "two"), "--batch-size", "2", "--grad-accum", "2",
                  "--num-processes", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("adapter written to") == 1  # one line per run, not per process
    a, b = load_adapter(tmp_path / "one"), load_adapter(tmp_path / "two")
    start = load_adapter_from_bundle(bundle)
    for index in a.tensors:
        for name in a.tensors[index]:
            assert torch.allclose(a.tensors[index][name], b.tensors[index][name], atol=1e-5, rtol=1e-4), name
    moved = max((a.tensors[i][k] - start[i][k]).abs().max().item() for i in a.tensors for k in a.tensors[i])
    assert moved > 1e-3  # the comparison means something: training changed the weights
    summary = b.training["summary"]
    assert summary["processes"] == 2 and summary["global_batch"] == 8 and summary["steps"] == 4
    losses = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert [r["loss"] for r in losses[0] if "loss" in r] == pytest.approx(
        [r["loss"] for r in losses[1] if "loss" in r], rel=1e-5)
    assert sum("eval" in r for r in losses[1]) == 2  # the main process validated, once per check
    assert a.training["summary"]["best_step"] == summary["best_step"]
    assert not list(tmp_path.glob(".*"))  # no checkpoint left behind


def distilled_in_one_and_two_processes(argv: list[str], tmp_path: Path, written: str, two_only: tuple[str, ...] = ()
                                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The bundle weights of `offsite ARGV` with distillation batch 4 in one process and 2 in each of two.

    Per-token normalisation: the mean over the processes' equal halves is the global batch's mean exactly
    (the global normalisation is a ratio of means, which halves average only approximately).
    """
    common = [*argv, "--distill-seq-len", "32", "--kd-normalise", "token", "--device", "cpu"]
    one = offsite(*common, "-o", str(tmp_path / "one"), "--distill-batch-size", "4")
    assert one.returncode == 0, one.stderr
    two = offsite(*common, "-o", str(tmp_path / "two"), "--distill-batch-size", "2", "--num-processes", "2",
                 *two_only)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count(written) == 1  # one line per run, not per process
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    return a, b


def test_two_processes_distil_the_emulator_one_process_distils(model_dirs, bundle, tmp_path):
    a, b = distilled_in_one_and_two_processes(
        ["emulate", str(model_dirs["llama"]), "--bottom", "1", "--top", "1", "--emulator-layers", "2",
         "--distill", str(bundle.parent / "train.txt"), "--distill-steps", "4"], tmp_path, "bundle written to")
    plain = load_file(bundle / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert max((a[k] - plain[k]).abs().max().item() for k in a) > 1e-5  # distillation changed the emulator
    manifest = json.loads((tmp_path / "two" / "offsite.json").read_text())
    assert manifest["emulator"]["distill"]["steps"] == 4
    assert not list(tmp_path.glob(".*"))  # the checkpoint folder is gone


def test_two_processes_holding_half_the_full_model_each_distil_as_one_process(model_dirs, bundle, tmp_path):
    from offsite.arch import get_layers
    from offsite.loading import load_model
    a, b = distilled_in_one_and_two_processes(
        ["emulate", str(model_dirs["llama"]), "--bottom", "1", "--top", "1", "--emulator-layers", "2",
         "--distill", str(bundle.parent / "train.txt"), "--distill-steps", "4"], tmp_path, "bundle written to",
        ("--shard-full-model",))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    one, two = (json.loads((tmp_path / run / "offsite.json").read_text())["emulator"]["distill"] for run in ("one", "two"))
    assert two["full_model_sharded"] and not one["full_model_sharded"] and not two["teacher_outputs_kept"]
    # The main process (rank 0) holds the first half of every block weight's rows (rounded up), the rest whole.
    blocks = [p for layer in get_layers(load_model(str(model_dirs["llama"]))) for p in layer.parameters()]
    whole = sum(p.numel() * p.element_size() for p in blocks)
    halves = sum(-(-p.shape[0] // 2) * (p.numel() // p.shape[0]) * p.element_size() for p in blocks)
    assert one["full_model_bytes_per_process"] - two["full_model_bytes_per_process"] == whole - halves > 0


def test_two_processes_align_as_one_process_aligns(model_dirs, bundle, tmp_path):
    from test_plug import untrained_adapter
    adapter = untrained_adapter(bundle, tmp_path / "adapter")
    a, b = distilled_in_one_and_two_processes(
        ["align", str(bundle), "--model", str(model_dirs["llama"]), "--adapter", str(adapter),
         "--distill", str(bundle.parent / "train.txt"), "--distill-steps", "2"], tmp_path,
        "re-aligned bundle written to")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    plain = load_file(bundle / "model.safetensors")
    assert max((a[k] - plain[k]).abs().max().item() for k in a) > 1e-6  # the emulator was re-aligned


def load_adapter_from_bundle(bundle: Path) -> dict[int, dict[str, torch.Tensor]]:
    from offsite.exchange.adapter import extract
    from offsite.exchange.bundle import bundle_index, load_bundle
    model, manifest = load_bundle(bundle)
    positions = bundle_index(manifest)
    return extract(model, {i: positions[i] for i in manifest.plan.adapter})


def _workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the training processes below `launcher`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"offsite.cli" in cmdline and f"OFFSITE_TEST_RUN={launcher}".encode() in environ:
            rank = next((v.split(b"=")[1] for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[int(rank)] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_killed_worker_fails_the_run_with_a_clear_message(bundle, tmp_path):
    data = bundle.parent / "train.txt"
    marker = os.getpid()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OFFSITE_TEST_RUN": str(marker)}
    run = subprocess.Popen([sys.executable, "-m", "offsite.cli", "tune", str(bundle), "--data", str(data),
                            "-o", str(tmp_path / "out"), "--max-steps", "100000", "--seq-len", "32",
                            "--batch-size", "2", "--device", "cpu", "--num-processes", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(workers := _workers(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(workers) == 2, "the launcher did not start two workers"
        time.sleep(8)  # into training
        os.kill(workers[1], signal.SIGKILL)
        _, err = run.communicate(timeout=120)  # fails within the timeout: nobody waits forever
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1
    assert "offsite tune: error: running in 2 processes failed" in err
    assert not (tmp_path / "out").exists()
    assert not _workers(marker)  # the other worker was stopped too


def test_num_processes_without_a_launcher_is_refused(bundle, tmp_path):
    config = TuneConfig(bundle=str(bundle), data=str(bundle.parent / "train.txt"), output=str(tmp_path / "a"),
                        train=TrainConfig(max_steps=1, seq_len=32), num_processes=2)
    with pytest.raises(OffsiteError, match="--num-processes 2, but this is one of 1 processes"):
        tune(config)


def test_shards_partition_the_batch_and_their_shares_sum_to_one():
    labels = torch.tensor([[1, 2, -100], [3, -100, -100], [4, 5, 6], [7, 8, -100], [9, -100, -100]])
    batch = {"labels": labels, "input_ids": labels.clamp_min(0)}
    parts = [Processes(rank, 2).shard(batch) for rank in range(2)]
    assert torch.equal(torch.cat([p[0]["labels"] for p in parts]), labels)
    assert [p[0]["labels"].shape[0] for p in parts] == [3, 2]
    assert sum(p[1] for p in parts) == pytest.approx(1.0)
    assert parts[0][1] == pytest.approx(6 / 9)
    short = {"labels": labels[:1], "input_ids": labels[:1]}
    assert Processes(1, 2).shard(short)[1] == 0  # nothing for the second process: it skips the micro-batch
    assert Processes().shard(batch) == (batch, 1.0)


@pytest.mark.slow  # three 2-process launches (about a minute): run with -m slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_two_process_run_killed_mid_way_resumes_to_the_adapter_of_an_uninterrupted_one(bundle, tmp_path):
    data = bundle.parent / "train.txt"
    argv = ["tune", str(bundle), "--data", str(data), "--max-steps", "40", "--seq-len", "32", "--batch-size", "2",
            "--lr", "1e-3", "--device", "cpu", "--num-processes", "2", "--checkpoint-every", "5"]
    straight = offsite(*argv, "-o", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    marker = time.monotonic_ns()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OFFSITE_TEST_RUN": str(marker)}
    state = tmp_path / ".out.tune" / "state.json"
    run = subprocess.Popen([sys.executable, "-m", "offsite.cli", *argv, "-o", str(tmp_path / "out")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if state.is_file() and json.loads(state.read_text() or "{}").get("step", 0) >= 10:
                break
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before it could be interrupted"
        os.kill(_workers(marker)[1], signal.SIGKILL)
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    stopped_at = json.loads(state.read_text())["step"]
    assert run.returncode == 1 and 10 <= stopped_at < 40 and not (tmp_path / "out").exists()
    resumed = offsite(*argv, "-o", str(tmp_path / "out"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming training from step" in resumed.stderr
    a, b = load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "out")
    for index in a.tensors:
        for name in a.tensors[index]:
            assert torch.allclose(a.tensors[index][name], b.tensors[index][name], atol=1e-6), name
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))  # each step once, written once
