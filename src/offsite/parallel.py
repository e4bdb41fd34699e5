"""Data-parallel training over the processes accelerate's launcher starts.

`accelerate launch -m offsite.cli tune ...` (or `offsite tune --num-processes N`, which calls that
launcher) starts N copies of `tune`. Every process opens the same verified bundle and draws the
same shuffled global micro-batches (per-process batch x processes); each takes its own rows. Its
loss is scaled by its share of the global micro-batch's scored tokens, so the gradients summed
over processes are exactly the gradient of the global micro-batch's mean loss: the run trains as
one process with the global batch would, to float rounding. Only the trainable (adapter)
gradients are all-reduced, as one flat tensor per step; the frozen emulator is never sent.
Validation, the best checkpoint, the metrics and the adapter file belong to the main process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, reduce

from offsite.arch import get_layers
from offsite.config import DeviceConfig
from offsite.device import Placement
from offsite.errors import OffsiteError


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one, unless launched by accelerate)."""

    rank: int = 0
    count: int = 1
    device: torch.device | None = None  # the launcher's device for this process (None: one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.count > 1

    def shard(self, batch: dict[str, torch.Tensor], ignore_index: int = -100) -> tuple[dict[str, torch.Tensor], float]:
        """This process's rows of a global micro-batch, and its share of the batch's scored tokens
        (labels other than `ignore_index`)."""
        if not self.parallel:
            return batch, 1.0
        rows = batch["labels"].shape[0]
        per_process = -(-rows // self.count)  # a short last batch leaves the last processes fewer rows
        mine = {name: value[self.rank * per_process: (self.rank + 1) * per_process] for name, value in batch.items()}
        scored = int((batch["labels"] != ignore_index).sum())
        return mine, int((mine["labels"] != ignore_index).sum()) / max(1, scored)

    def rows(self, indices: list[int]) -> list[int]:
        """This process's part of a global batch's rows, cut as `shard` cuts a batch."""
        per_process = -(-len(indices) // self.count)
        return indices[self.rank * per_process: (self.rank + 1) * per_process]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the trainable parameters' gradients over the processes (one all-reduce)."""
        if not self.parallel:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset: offset + grad.numel()].view_as(param).clone()
            offset += grad.numel()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return reduce(value, reduction="sum") if self.parallel else value

    def mean_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the trainable parameters' gradients over the processes (each a mean over its own rows)."""
        if self.parallel:
            self.sum_gradients(params)
            for param in params:
                param.grad /= self.count

    def placement(self, runtime: DeviceConfig) -> Placement:
        """Where this process runs: `--device auto` means the device the launcher gave it."""
        device = str(self.device) if self.parallel and runtime.device == "auto" else runtime.device
        return Placement.of(device, runtime.dtype)

    def from_main(self, value: Any) -> Any:
        """The main process's `value`, on every process (e.g. its decision to stop early)."""
        if not self.parallel:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]


ONE = Processes()


def shard_frozen(model: torch.nn.Module, placement: Placement, processes: Processes) -> None:
    """Hold 1/N of every block of a frozen `model` in each of the N processes (FSDP2, full sharding).

    A block's weights are gathered from all processes just before its forward and freed after it, so
    a process holds its shards and one block instead of the whole model: the full model of a
    distillation that does not fit one device. The rest (embeddings, final norm, head) is small next
    to the blocks and stays whole in every process. Every process must then run the model's forward
    at the same steps (each gather is a collective).
    """
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415 - only for sharded runs
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    model.requires_grad_(False)
    if placement.mixed:
        model.to(placement.dtype)
    mesh = init_device_mesh(placement.device.type, (processes.count,))
    for block in get_layers(model):
        # Each block its own root: a forward stopped after a block (hidden_states_at) leaves nothing gathered.
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    model.to(placement.device)


def held_bytes(model: torch.nn.Module) -> int:
    """The bytes of `model`'s weights this process holds (its own shards only, for a sharded model)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


LAUNCHED = "OFFSITE_LAUNCHED"  # set by `launch` for its processes: they must not launch again


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current(runtime: DeviceConfig, asked: int, command: str) -> Processes:
    """This process's place: from accelerate's state when a launcher started several processes.

    The processes train on CPUs (gloo) with `--device cpu` or without CUDA, else on one GPU each
    (nccl). `asked`: the command's --num-processes, which must match the launch when above 1.
    """
    processes = ONE
    if launched():
        cpu = runtime.device == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)  # reads the launcher's environment and joins the process group
        processes = Processes(state.process_index, state.num_processes, torch.device("cpu") if cpu else state.device)
    if asked > 1 and asked != processes.count:
        raise OffsiteError(f"--num-processes {asked}, but this is one of {processes.count} processes: start several "
                           f"with `offsite {command} --num-processes N` (from the command line) or `accelerate "
                           f"launch --multi_gpu --num_processes N -m offsite.cli {command} ...`")
    return processes


def launch(argv: list[str], count: int) -> None:
    """Run `offsite ARGV` in `count` processes through accelerate's launcher; fail in one line if any fails.

    When a process dies, the launcher stops the others (none waits forever on the next all-reduce).
    """
    with socket.socket() as probe:  # a free port, so that two runs on one machine do not meet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # --multi_gpu is accelerate's torchrun launcher, which starts the processes on CPUs too (its --cpu
    # starts one process, or needs MPI); the processes choose gloo on CPUs themselves (`current`).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "offsite.cli", *argv]
    env = {**os.environ, LAUNCHED: "1"}
    code = subprocess.run(command, check=False, env=env).returncode
    if code != 0:
        raise OffsiteError(f"running in {count} processes failed (exit code {code}): a process stopped or was "
                           "killed, and the launcher stopped the others; the first error is above. Nothing was "
                           "written; a checkpoint, if one was saved, resumes the same command")
