"""How a reversion fits its gradient passes in memory: how many noise pairs go through the network
at once (the micro-batch; the gradient of the batch's mean loss is accumulated chunk by chunk, so the
result is the same up to float rounding) and whether stage 2's differentiable sampler recomputes
each network call in the backward pass instead of keeping its activations.

Measured with benchmarks/bench_scale.py (random weights, batch 16, standard's 10 sampler steps):
- CPU (2 threads): a DDPM-CIFAR10 UNet (35.7 M parameters, 3x32x32) peaked at 11.4 GiB RSS in stage 2
  kept whole, so a batch of that many input values is the most one CPU chunk holds; larger inputs are
  split and checkpointed. A process out of RAM is killed, not told, hence a fixed rule there.
- CUDA (one H200): a 256 px DDPM (113.7 M) checkpointed took 8.6 GiB at micro-batch 1 (1,197 s for
  standard's 600 + 60 iterations) and 129 GiB at 16 (383 s). A GPU reports running out
  (torch.OutOfMemoryError), so there the whole batch goes first and the reversion halves the
  micro-batch each time it runs out (MemoryPlan.halved), keeping what fits for the rest of the scan.
Forward-only passes (the searches, the basin test) are split the same way above 3x32x32 (forward_chunk).
Zoo models (16 px, 4x8x8 latents) and 32 px models run in one piece on either device, unchanged."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

CHUNK_VALUES = 16 * 3 * 32 * 32  # input values per CPU chunk: a DDPM-CIFAR10 batch of 16 (see above)
CHECKPOINT_ABOVE = 3 * 32 * 32  # input values per sample above which stage 2's sampler is checkpointed


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int  # noise pairs (stage 1) or sampled trigger noises (stage 2) per gradient pass
    checkpointed_sampler: bool  # stage 2 recomputes each network call in the backward pass
    halvings: int = 0  # times the device ran out of memory and the micro-batch was halved

    def to_dict(self) -> dict:
        return asdict(self)

    def forward_chunk(self) -> int | None:
        """Samples per forward-only network call (the searches' and the basin test's batches of up to 128
        noises): all at once for inputs up to 3x32x32, else as many as one gradient pass holds."""
        return 2 * self.micro_batch if self.checkpointed_sampler else None

    def halved(self) -> "MemoryPlan | None":
        """The plan after running out of memory; None when a single pair did not fit."""
        if self.micro_batch <= 1:
            return None
        return replace(self, micro_batch=self.micro_batch // 2, halvings=self.halvings + 1)


def memory_plan(input_shape, batch_size: int, device="cpu") -> MemoryPlan:
    values = math.prod(int(d) for d in input_shape)
    checkpointed = values > CHECKPOINT_ABOVE
    if str(device).split(":")[0] in ("cuda", "mps"):  # the whole batch first, halved on out-of-memory
        return MemoryPlan(micro_batch=batch_size, checkpointed_sampler=checkpointed)
    return MemoryPlan(micro_batch=max(1, min(batch_size, CHUNK_VALUES // values)), checkpointed_sampler=checkpointed)
