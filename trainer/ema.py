"""An exponential moving average of the network weights (`trainer.ema`).

With `trainer.ema.decay` = d > 0 the trainer keeps, beside the trained weights w, an
average a updated after every optimizer step that ran (skipped steps do not count):

    a <- d_n * a + (1 - d_n) * w,    d_n = min(d, (1 + n) / (10 + n)),   n = 1, 2, ...

The warm-up of d_n (as in TensorFlow's `ExponentialMovingAverage` with `num_updates`)
keeps the first steps' average from being dominated by the initial weights: until d_n
reaches d, after about 9 / (1 - d) updates (4,500 for d = 0.998), the average spans
about the last (10 + n) / 9 steps; from then on about the last 1 / (1 - d).

Why: on small validation sets the trained weights' metrics move by more than the
differences between steps (Census-Income's validation income AUC by +-.002 from one
evaluation to the next), so model selection partly picks noise; the average moves
smoothly and sits higher (README, Results).

Which weights: the network parameters, those the network optimizer trains (core, towers, experts; under
expert parallelism each rank averages its own expert slices), not the embedding tables.
TorchRec's fused optimizer updates the table shards inside backward, and an average of
the tables would double the largest state of a recommendation model. Buffers (batch-norm
statistics, the SMES selection bias) are used as they are. The average is kept in fp32.

Where the average is used: it is the model that is evaluated. Every validation (so model
selection chooses among averaged models), the test metrics of `summary.json`, and the
weights that `trainer.predict` and `trainer.export` read from a checkpoint
(`trainer.checkpoint.load_model` loads the average over the trained weights). Training
itself always continues from the trained weights.

State: every checkpoint holds the average as `ema` (DCP, expert slices resharded like
the model's) and the update count in its meta, so a resumed run continues the same
average. Cost per step: one `torch._foreach_lerp_` over the network parameters, no host sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(kw_only=True)
class EMAConfig:
    """`trainer.ema`, see the module doc.

    Attributes:
        decay: d in [0, 1); 0 = off (the trained weights are evaluated).
    """

    decay: float = 0.0


def check_config(cfg: EMAConfig) -> None:
    """ValueError naming the key."""
    if not 0.0 <= cfg.decay < 1.0:
        raise ValueError(f"trainer.ema.decay must be in [0, 1) (0 = off), got {cfg.decay}")


def warmed_decay(decay: float, num_updates: int) -> float:
    """d_n of the module doc for the `num_updates`-th update (from 1)."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class WeightAverage:
    """The average of `params` (name -> parameter); see the module doc.

    Args:
        params: the averaged parameters by name (the network optimizer's names).
        decay: d.
    """

    def __init__(self, params: dict[str, nn.Parameter], *, decay: float) -> None:
        self.decay = decay
        self.names = list(params)
        self._params = list(params.values())
        self.averages = [p.detach().float().clone() for p in self._params]
        self.num_updates = 0

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters' current tensors (read at each use: an engine such as DeepSpeed
        may point a parameter at new storage after this was built)."""
        return [p.detach() for p in self._params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average toward the current weights (after an optimizer step)."""
        self.num_updates += 1
        weight = 1.0 - warmed_decay(self.decay, self.num_updates)
        torch._foreach_lerp_(self.averages, [p.float() for p in self.params], weight)

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the current weights (a resumed checkpoint without an average)."""
        torch._foreach_copy_(self.averages, self.params)
        self.num_updates = 0

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model inside the block; the trained ones (bit for
        bit) after it."""
        params = self.params
        with torch.no_grad():
            trained = [p.clone() for p in params]
            torch._foreach_copy_(params, self.averages)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, trained)

    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> average: the live tensors, so a checkpoint loads into them in place."""
        return dict(zip(self.names, self.averages, strict=True))
