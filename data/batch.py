"""The one batch type every source yields and the trainer consumes.

Legend: B instances in the (local) batch, Dn dense columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass(slots=True)
class Batch(Pipelineable):
    """A local batch.

    Attributes:
        dense: `[B, Dn]` float32 dense features (already normalised).
        sparse: KJT with one key per sparse feature, stride B.
        labels: task -> `[B]` float32 labels in {0, 1}.
        weights: `[B]` float32 per-instance weight; 0 marks padding rows that the
            evaluation loader adds so that every rank runs the same number of steps.
        user_id: `[B]` int64, or None when the source has no user ids.
        cluster_id: `[B]` int64 latent cluster code (`Split.clusters`), or None; the batches of a
            split with clusters carry it (`data=parquet_stream`: val and test, for the
            cluster-expert NMI of evaluation). Never a model input.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: dict[str, torch.Tensor]
    weights: torch.Tensor
    user_id: torch.Tensor | None = None
    cluster_id: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
            weights=self.weights.to(device, non_blocking=non_blocking),
            user_id=None if self.user_id is None else self.user_id.to(device, non_blocking=non_blocking),
            cluster_id=None if self.cluster_id is None else self.cluster_id.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            weights=self.weights.pin_memory(),
            user_id=None if self.user_id is None else self.user_id.pin_memory(),
            cluster_id=None if self.cluster_id is None else self.cluster_id.pin_memory(),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)  # type: ignore[arg-type]
        self.sparse.record_stream(stream)  # type: ignore[arg-type]
        for v in self.labels.values():
            v.record_stream(stream)  # type: ignore[arg-type]
        self.weights.record_stream(stream)  # type: ignore[arg-type]
        if self.user_id is not None:
            self.user_id.record_stream(stream)  # type: ignore[arg-type]
        if self.cluster_id is not None:
            self.cluster_id.record_stream(stream)  # type: ignore[arg-type]
