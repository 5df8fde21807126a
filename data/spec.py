"""Feature and task schema shared by every data source and by the model builder.

A source describes what it yields with a `DatasetSpec`; the model builder turns the
sparse features into TorchRec `EmbeddingBagConfig`s and sizes the dense input from it.
Id 0 of every sparse feature is reserved for "missing / unseen" so that values never
seen in the training split still map to a valid row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseFeature:
    """One categorical (single-hot) or multi-hot id feature.

    Attributes:
        name: feature (and KJT key) name.
        num_embeddings: table size; ids are in `[0, num_embeddings)`, 0 = missing.
        multi_hot: whether a row may hold several ids (pooled by sum in the EBC).
    """

    name: str
    num_embeddings: int
    multi_hot: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetSpec:
    """What a source yields: sparse features, dense columns, tasks, user ids."""

    name: str
    sparse: tuple[SparseFeature, ...]
    dense_names: tuple[str, ...]
    tasks: tuple[str, ...]
    has_user_id: bool

    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    @property
    def sparse_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.sparse)

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(name)
