"""Shared recorder of the largest difference between our outputs and a reference's."""

from __future__ import annotations

import torch


class MaxDiff:
    """One place that compares ours vs the reference (HF, fairseq), keeps the largest absolute
    difference seen per named output, and prints the table the closing notes quote.

    Each parity module holds one (``MAX_DIFF = MaxDiff(ATOL)``), calls :meth:`check` per output
    and :meth:`report` once at the end (``pytest -s`` shows it)."""

    def __init__(self, atol: float) -> None:
        self.atol = atol
        self.diffs: dict[str, float] = {}

    def record(self, name: str, diff: float) -> None:
        """Keep ``diff`` (also a relative one, e.g. of a loss) if it is the largest for ``name``."""
        self.diffs[name] = max(self.diffs.get(name, 0.0), diff)

    def check(self, name: str, ours: torch.Tensor, theirs: torch.Tensor, *, record_as: str | None = None) -> float:
        """Assert equal shapes and max abs difference <= atol; record it under ``record_as`` or ``name``."""
        assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(theirs.shape)}"
        diff = (ours.float() - theirs.float()).abs().max().item() if theirs.numel() else 0.0
        self.record(record_as or name, diff)
        assert diff <= self.atol, f"{name}: max abs diff {diff:.3g} > {self.atol}"
        return diff

    @property
    def worst(self) -> float:
        """The largest difference recorded so far (0 when none)."""
        return max(self.diffs.values(), default=0.0)

    def report(self, title: str) -> None:
        """Print the largest difference per name, sorted by name."""
        print(f"\n{title}: max abs diff over {len(self.diffs)} compared outputs, worst {self.worst:.2e}")
        width = max((len(name) for name in self.diffs), default=0)
        for name, diff in sorted(self.diffs.items()):
            print(f"  {name:{width}s}  {diff:.2e}")
