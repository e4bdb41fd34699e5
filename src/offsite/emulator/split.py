"""Split planning: which original layers form the adapter and which the emulator keeps (uniform spacing).

Pure arithmetic on layer indices; `offsite.emulator.surgery` applies a plan to a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from offsite.config import SplitConfig
from offsite.errors import check

ROLES = ("adapter_bottom", "emulator", "adapter_top")


@dataclass(frozen=True)
class SplitPlan:
    """Original layer indices of each part of a model with `num_layers` blocks."""

    num_layers: int
    bottom: tuple[int, ...]
    emulator: tuple[int, ...]
    top: tuple[int, ...]

    @property
    def adapter(self) -> tuple[int, ...]:
        return self.bottom + self.top

    @property
    def kept(self) -> tuple[int, ...]:
        """Original indices of the bundle's layers, in order."""
        return self.bottom + self.emulator + self.top

    @property
    def keeps_whole_middle(self) -> bool:
        """True when the emulator is every middle layer: such a bundle carries the whole full model."""
        return len(set(self.emulator)) == self.num_layers - len(self.bottom) - len(self.top)

    def roles(self) -> list[tuple[int, str]]:
        """(original index, role) for every bundle layer, in bundle order."""
        return ([(i, "adapter_bottom") for i in self.bottom] + [(i, "emulator") for i in self.emulator]
                + [(i, "adapter_top") for i in self.top])


def uniform_indices(middle: int, kept: int) -> list[int]:
    """Indices into a middle block of `middle` layers: round(i*(M-1)/(K-1)), ends always kept."""
    if kept == 1:
        return [0]
    return [round(i * (middle - 1) / (kept - 1)) for i in range(kept)]


def plan_split(num_layers: int, split: SplitConfig) -> SplitPlan:
    """Check `split` against a model with `num_layers` blocks and choose the layers."""
    problems: list[str] = []
    if split.bottom + split.top >= num_layers:
        problems.append(
            f"--bottom={split.bottom} plus --top={split.top} leaves no middle layer in a {num_layers}-layer "
            f"model; they must sum to at most {num_layers - 1}"
        )
    check(problems)
    middle = num_layers - split.bottom - split.top
    kept = split.kept_middle_count(middle)
    if kept > middle:
        problems.append(
            f"--emulator-layers={kept} is more than the {middle} middle layers of this {num_layers}-layer model "
            f"(after --bottom={split.bottom} --top={split.top}); use a value from 1 to {middle}"
        )
    check(problems)
    first = split.bottom
    return SplitPlan(
        num_layers=num_layers,
        bottom=tuple(range(split.bottom)),
        emulator=tuple(first + i for i in uniform_indices(middle, kept)),
        top=tuple(range(num_layers - split.top, num_layers)),
    )
