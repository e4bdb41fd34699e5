"""A bundle whose emulator blocks' linear weights are rounded to a few bits: the other way to make an emulator lossy.

    python benchmarks/rounded_bundle.py BUNDLE -o ROUNDED --bits 4 [--group 64]

Layer-drop removes whole blocks; rounding keeps every block (`BUNDLE` made with `--emulator-layers` equal
to the middle size) and damages all of them: round to nearest on a symmetric grid of 2^(bits-1) - 1 steps
each side, one scale per output channel (`--group 0`) or per `--group` consecutive weights of a row. The
weights stay float32 (a probe of quality, not of bytes: `--method int8` is the storage format), the adapter
blocks, embeddings and head are untouched, so the fingerprint and plugging are unchanged and the demo's
stages run on the result as on any bundle (docs/results/2026-12-05-rounded-and-in-domain.md).
"""

from __future__ import annotations

import argparse

import torch

from offsite.emulator.compress import linear_modules
from offsite.exchange.bundle import emulator_positions, load_bundle, write_bundle
from offsite.loading import load_tokenizer


def rounded(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """`weight` (out, in) rounded to nearest on a symmetric `bits`-bit grid, one scale per row or row group."""
    steps = 2 ** (bits - 1) - 1
    rows = weight.reshape(-1, group) if group else weight
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / steps
    return (torch.round(rows / scale).clamp(-steps, steps) * scale).reshape(weight.shape)


def round_bundle(bundle: str, output: str, bits: int, group: int) -> float:
    """Write the rounded bundle; return the mean relative error of the rounded weights."""
    model, manifest = load_bundle(bundle)
    positions = sorted(emulator_positions(manifest).values())
    errors = []
    with torch.no_grad():
        for module in linear_modules(model, positions).values():
            new = rounded(module.weight.float(), bits, group).to(module.weight.dtype)
            errors.append(float((new - module.weight).norm() / module.weight.norm()))
            module.weight.copy_(new)
    write_bundle(output, True, model, load_tokenizer(bundle), manifest)
    return sum(errors) / len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--bits", type=int, required=True, help="2 or more")
    parser.add_argument("--group", type=int, default=0, help="weights per scale within a row (0: the whole row)")
    args = parser.parse_args()
    if args.bits < 2:
        parser.error("--bits must be 2 or more: 1 bit leaves only the sign's zero")
    error = round_bundle(args.bundle, args.output, args.bits, args.group)
    print(f"{args.output}: emulator weights rounded to {args.bits} bits, mean relative error {error:.3f}")


if __name__ == "__main__":
    main()
