"""Peak memory of the model owner's `emulate` and `plug`, streamed against loading the whole model.

Builds a random-weight model of GPT2-large shape (36 blocks, about 3.1 GB in float32; no download),
then runs each step in its own process and reads that process's peak resident memory:

    python benchmarks/streaming_memory.py --out /tmp/runs/streaming      # about 10 minutes, 10 GB of disk

It also checks that the two paths wrote the same weights (byte-identical files when both wrote one
file, equal tensors when sharded) and writes everything to OUT/streaming.json.

A child's peak memory counts its parent's memory at the fork, so this process stays small: it
imports nothing heavy, and builds the model and compares the outputs in child processes of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = "gpt2-large"
SPLIT = ["--bottom", "2", "--top", "2", "--emulator-layers", "8"]


def build_model(directory: Path) -> None:
    """A random GPT2-large-shape model with the built-in model's tokenizer (in a child process)."""
    import torch  # here only: the measuring process stays small
    from transformers import AutoConfig, AutoModelForCausalLM

    from offsite.loading import load_tokenizer
    from offsite.studies.bench.settings import RANDOM_SHAPES

    if not (directory / "config.json").is_file():
        fields = dict(RANDOM_SHAPES[SHAPE])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(directory, max_shard_size="50GB")  # one file, as such checkpoints often come
        load_tokenizer("smollm2-135m").save_pretrained(directory)


def peak_rss(argv: list[str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of `offsite ARGV` in a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "offsite.cli", "-q", *argv])
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"offsite {' '.join(argv)} failed")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def same_weights(a: Path, b: Path) -> str:
    """How the two outputs' weights compare (in a child process)."""
    import torch  # here only, as in build_model
    from safetensors.torch import load_file

    from offsite.files import sha256_file

    files_a, files_b = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if [p.name for p in files_a] == [p.name for p in files_b] and all(
            sha256_file(x) == sha256_file(y) for x, y in zip(files_a, files_b)):
        return "byte-identical files"
    tensors_a = {k: v for p in files_a for k, v in load_file(p).items()}
    tensors_b = {k: v for p in files_b for k, v in load_file(p).items()}
    if tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a):
        return "equal tensors (sharded differently)"
    return "DIFFERENT"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-shard-size", default=None, help="passed to emulate and plug (default: theirs)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compare", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build_model(args.build)
    if args.compare:
        return print(same_weights(*args.compare))
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "full"
    subprocess.run([sys.executable, __file__, "--out", str(args.out), "--build", str(model)], check=True)
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    shard = ["--max-shard-size", args.max_shard_size] if args.max_shard_size else []
    rows, outputs = [], {}
    for step in ("emulate", "plug"):
        for mode in ("loaded", "streamed"):
            output = args.out / f"{step}-{mode}"
            shutil.rmtree(output, ignore_errors=True)
            flags = (["--no-stream"] if mode == "loaded" else []) + shard
            if step == "emulate":
                argv = ["emulate", str(model), "-o", str(output), *SPLIT, *flags]
            else:
                argv = ["plug", str(model), str(args.out / "adapter"), "-o", str(output), *flags,
                        "--bundle", str(args.out / "emulate-streamed")]
            peak, seconds = peak_rss(argv)
            rows.append({"step": step, "mode": mode, "peak_rss_bytes": peak, "share_of_model": peak / model_bytes,
                         "seconds": round(seconds, 1), "files": sorted(p.name for p in output.glob("*.safetensors"))})
            print(f"{step:8s} {mode:9s} peak {peak / 2**30:.2f} GiB = {peak / model_bytes:.2f} x the model, "
                  f"{seconds:.0f} s", flush=True)
            outputs[step, mode] = output
        if step == "emulate":  # an adapter to plug: one training step through the streamed bundle
            adapter = args.out / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            text = args.out / "text.txt"
            text.write_text("The model owner streams the full model's files shard by shard. " * 40)
            subprocess.run([sys.executable, "-m", "offsite.cli", "-q", "tune", str(outputs["emulate", "streamed"]),
                            "--data", str(text), "-o", str(adapter), "--max-steps", "1", "--batch-size", "1",
                            "--seq-len", "32"], check=True)
    checks = {step: subprocess.run([sys.executable, __file__, "--out", str(args.out), "--compare",
                                    str(outputs[step, "loaded"]), str(outputs[step, "streamed"])],
                                   check=True, capture_output=True, text=True).stdout.strip()
              for step in ("emulate", "plug")}
    report = {"shape": SHAPE, "model_bytes": model_bytes, "split": " ".join(SPLIT),
              "max_shard_size": args.max_shard_size or "default", "rows": rows, "same_weights": checks}
    (args.out / "streaming.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(checks))


if __name__ == "__main__":
    main()
