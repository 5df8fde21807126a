"""How batches reach the training step: in line, or through TorchRec's sparse-dist pipeline.

`trainer.pipeline`:

- `none`: every step pulls its batch, copies it to the device and runs forward,
  backward and the optimizer; the embedding input distribution (the KJT all-to-alls
  of the sharded tables) runs inside forward, in line with compute.
- `sparse_dist` (default): `torchrec.distributed.train_pipeline.TrainPipelineSparseDist`.
  While batch i runs forward / backward / optimizer, batch i+1's input distribution
  and batch i+2's host-to-device copy are in flight (their own CUDA streams on GPU).
  It fits this model as is: the model's forward takes the batch, so the pipeline's fx
  trace finds the sharded EBC's input as `batch.sparse` (a getattr on the input), and
  the core and towers, which hold no sharded module, stay opaque leaves of the trace.
  `TrainPipelineSparseDist` was chosen over the semi-sync and prefetch variants
  because they change what the step computes (stale embeddings, or a UVM cache this
  project does not use), and over `StagedTrainPipeline` because the sparse-dist one
  also overlaps the second half of the input distribution (the value all-to-all) with
  forward.

The pipeline runs the trainer's own phases (`StepHooks`): its forward calls
`forward_step` (forward, losses, the all-reduced loss parts and the skip decision),
its backward and optimizer hooks call `backward_step` / `optimizer_step`, which do
nothing for a skipped step. So non-finite-loss skipping, gradient clipping, the
expert-gradient sync, bias balancing and both engines behave as without it; a parity
test checks per-step losses and final weights with and without the pipeline.

Loader position: the pipeline pulls two batches ahead, so the loader's own position
is ahead of training. `LoaderCursor` records the loader state before every pull and
reports the state after the last *trained* batch, which is what checkpoints save;
a resumed run therefore continues with the first batch not trained yet.

Evaluation runs the model directly: the trainer detaches the pipeline (restoring the
sharded modules' forwards) around it and re-attaches it after (`paused`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from data.batch import Batch


class StepHooks(Protocol):
    """The trainer's phases of one step, called in this order."""

    def zero_grad(self) -> None: ...

    def forward_step(self, batch: Batch) -> tuple[torch.Tensor, Any]: ...

    def backward_step(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self) -> None: ...


class LoaderCursor:
    """Iterator over a loader that knows the loader state after each trained batch.

    `state_dict()` is the loader position right after the `consumed` batches trained so
    far (not the pulled ones), `load_state_dict` positions the loader before iteration.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it: Iterator[Batch] | None = None
        self.pulled = self.consumed = 0
        self._states: dict[int, Any] = {}

    def __iter__(self) -> LoaderCursor:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = iter(self.loader)
        self._states[self.pulled] = self.loader.state_dict()  # the position of this batch
        batch = next(self._it)
        self.pulled += 1
        return batch

    def trained(self) -> None:
        """One more pulled batch has been trained on."""
        self.consumed += 1
        self._states.pop(self.consumed - 1, None)

    def state_dict(self) -> Any:
        return self._states.get(self.consumed, self.loader.state_dict())

    def load_state_dict(self, state: Any) -> None:
        assert self._it is None, "position the loader before iterating"
        self.loader.load_state_dict(state)

    def load_resharded(self, states: list[Any]) -> None:
        """Resume from every rank's saved state of a run at another world size."""
        assert self._it is None, "position the loader before iterating"
        self.loader.load_resharded(states)


class _ZeroGrad:
    """The `optimizer` TorchRec's pipeline holds: it only zeroes gradients through the
    trainer; the step itself goes through `_optimizer_step` below."""

    def __init__(self, hooks: StepHooks) -> None:
        self.hooks = hooks

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.hooks.zero_grad()

    def step(self) -> None:  # pragma: no cover - never called, see SparseDistPipeline
        raise AssertionError("the trainer steps the optimizer")


class SparseDistPipeline(TrainPipelineSparseDist):
    """`TrainPipelineSparseDist` whose forward, backward and optimizer are the trainer's."""

    def __init__(self, model: torch.nn.Module, hooks: StepHooks, device: torch.device) -> None:
        super().__init__(
            model,
            _ZeroGrad(hooks),  # type: ignore[arg-type]
            device,
            execute_all_batches=True,
            custom_model_fwd=hooks.forward_step,
        )
        self.hooks = hooks

    def _backward(self, losses: torch.Tensor) -> None:
        self.hooks.backward_step(losses)

    def _optimizer_step(self) -> None:
        self.hooks.optimizer_step()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Original forwards of the sharded modules (for evaluation), then re-attach."""
        self.detach()
        try:
            yield
        finally:
            self.attach(self._model)


class InlineSteps:
    """`trainer.pipeline=none`: the same phases, one batch at a time."""

    def __init__(self, hooks: StepHooks, device: torch.device) -> None:
        self.hooks, self.device = hooks, device

    def progress(self, batches: Iterator[Batch]) -> Any:
        self.hooks.zero_grad()
        batch = next(batches).to(self.device, non_blocking=True)
        loss, out = self.hooks.forward_step(batch)
        self.hooks.backward_step(loss)
        self.hooks.optimizer_step()
        return out

    @contextmanager
    def paused(self) -> Iterator[None]:
        yield
