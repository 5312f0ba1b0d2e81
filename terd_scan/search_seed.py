"""What a global proposal search (patch_search, narrow_search, canvas_search) returns: its best
candidate, which seeds a full TERD run when its screen ratio is low enough, and what the search cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class SearchSeed:
    r: torch.Tensor  # (C, H, W): the best candidate, where a seeded reversion starts
    ratio: float  # the candidate's screen ratio (each search defines its own)
    candidates: int
    network_evaluations: int
    seed_below: ClassVar[float]  # a ratio below this seeds a run

    @property
    def has_basin(self) -> bool:
        return self.ratio < self.seed_below

    def offset(self) -> list[float]:
        """The candidate's per-channel mean, rounded (the constant offset of the narrow and canvas searches)."""
        return [round(float(v), 3) for v in self.r.flatten(1).mean(1)]

    def summary(self) -> dict:
        """The report's fields: the search's own (search_fields) and then the ratio and the cost."""
        return {**self.search_fields(), "ratio": round(self.ratio, 4), "candidates": self.candidates,
                "network_evaluations": self.network_evaluations}

    def search_fields(self) -> dict:
        return {}
