"""Reference scorer of an exported model: `InferenceModel.load(DIR)(batch) -> logits`.

Imports only torch, safetensors, the standard library and the project's torch-only
grouped-matmul op (no torchrec, hydra or data / training modules), so a serving
process needs, besides torch and safetensors, these files of the project, at these
paths under one folder on its `sys.path`:

    trainer/__init__.py, trainer/serving/scorer.py     this scorer
    model/__init__.py, model/moe/__init__.py    packages (they import nothing)
    model/moe/grouped.py                        the grouped expert MLP the op runs
    model/moe/host.py                           its one host read (the loop's sizes)

and the artifact folder that `python -m trainer.export` writes:

    DIR/model.json          format, tasks, features (table, size, multi-hot), embedding
                            width, dense columns with their train mean / std and
                            transform, the run it came from
    DIR/vocab.json          feature -> the train values of ids 1, 2, ... (id 0 = missing
                            or unseen)
    DIR/tables.safetensors  one `[num_embeddings, embedding_dim]` table per feature
    DIR/dense.pt2           torch.export program: `x_BD -> logits_BT`, the network (core
                            and towers) in evaluation mode (`x_BD` = the pooled embeddings
                            in feature order, then the dense columns); the file keeps its
                            pre-issue-22 name

Scoring a batch: every feature's ids are sum-pooled from its table
(`embedding_bag`, as TorchRec's EmbeddingBagCollection does: a row with no ids pools
to zeros, id 0 is the learned "missing / unseen" row), concatenated in feature order
with the dense columns, and run through the program. Batches are what the trainer
feeds (`data.batch.Batch`) or anything shaped like them: `.dense` `[B, Dn]` float32,
already normalised, and `.sparse` either a KeyedJaggedTensor (read through its
`to_dict()`, no torchrec import needed) or a dict feature -> `(values, lengths)`.
`encode_ids` / `normalize_dense` turn raw values into those inputs with the exported
vocabularies and statistics.

The SMES program runs its experts through the custom op `smes_serving::grouped_mlp`
(defined here, so importing this module is what makes `dense.pt2` loadable): the
expert MLP over expert-contiguous rows of `model.moe.grouped`, the code the training
model evaluates with (`GroupedExperts`, `auto` backend): the grouped kernel where it
runs, with the same alignment and padding rules, else one `addmm` per active expert.
It is an opaque op because the grouped kernel's tracing rule accepts bf16 only (the
CUDA kernel's contract), although the CPU kernel takes fp32 (see `trainer/export.py`).

Legend: B instances, D program input width, Dn dense columns, E experts, H width,
N (instance, expert) pairs, T tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model.moe.grouped import expert_mlp, kernel_choice

FORMAT = "smes-rec-inference/1"
MODEL_JSON, VOCAB_JSON, TABLES, PROGRAM = "model.json", "vocab.json", "tables.safetensors", "dense.pt2"


# ------------------------------------------------------------------ the experts op


@torch.library.custom_op("smes_serving::grouped_mlp", mutates_args=())
def grouped_mlp(
    x_ND: torch.Tensor, counts_E: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]
) -> torch.Tensor:
    """The expert MLPs (Linear -> ReLU per layer, `model.moe.grouped.expert_mlp`, as
    `GroupedExperts` runs them with the `auto` backend) over rows sorted by expert,
    `counts_E` rows each: `[N, D] -> [N, H]`."""
    choice = kernel_choice(x_ND, weights[0], "auto")
    h_NH = expert_mlp(x_ND, counts_E, weights, biases, choice=choice)
    return h_NH.clone() if h_NH is x_ND else h_NH.contiguous()


@grouped_mlp.register_fake
def _grouped_mlp_fake(
    x_ND: torch.Tensor, counts_E: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]
) -> torch.Tensor:
    return x_ND.new_empty(x_ND.shape[0], weights[-1].shape[-1])


# ------------------------------------------------------------------------ the scorer


def _jagged(sparse: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(values, lengths)` of one feature from a KJT-like object or a dict."""
    if hasattr(sparse, "to_dict"):
        jt = sparse.to_dict()[name]
        return jt.values(), jt.lengths()
    values, lengths = sparse[name]
    return torch.as_tensor(values), torch.as_tensor(lengths)


class InferenceModel:
    """An exported model on one process (see the module doc).

    Attributes:
        meta: `model.json`.
        tasks: task names, the order of the logits' columns.
        features: feature names, the order of the pooled embeddings in the program input.
        tables: feature -> `[V, De]` table.
        program: the loaded `torch.export` program's module.
    """

    def __init__(self, meta: dict[str, Any], tables: dict[str, torch.Tensor], program: torch.nn.Module,
                 vocab: dict[str, list[str]] | None = None) -> None:  # fmt: skip
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} artifact: format {meta.get('format')!r}")
        self.meta, self.program, self.vocab = meta, program, vocab
        self.tasks: tuple[str, ...] = tuple(meta["tasks"])
        self.features: tuple[str, ...] = tuple(f["name"] for f in meta["features"])
        self.tables = {f["name"]: tables[f["table"]] for f in meta["features"]}
        self.num_dense = len(meta["dense"]["names"])
        self._index: dict[str, dict[str, int]] = {}

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> InferenceModel:
        """Load an artifact folder onto `device`."""
        path = Path(path)
        meta = json.loads((path / MODEL_JSON).read_text())
        tables = {k: v.to(device) for k, v in load_file(str(path / TABLES)).items()}
        program = torch.export.load(str(path / PROGRAM)).module().to(device)
        vocab_path = path / VOCAB_JSON
        vocab = json.loads(vocab_path.read_text()) if vocab_path.exists() else None
        return cls(meta, tables, program, vocab)

    def pool(self, sparse: Any, batch_size: int) -> torch.Tensor:
        """`[B, F*De]`: every feature's ids sum-pooled from its table, in feature order."""
        pooled = []
        for name in self.features:
            table = self.tables[name]
            values, lengths = _jagged(sparse, name)
            if lengths.numel() != batch_size:
                raise ValueError(f"feature {name!r}: {lengths.numel()} lengths for a batch of {batch_size}")
            offsets = torch.zeros(batch_size, dtype=torch.long, device=table.device)
            offsets[1:] = torch.cumsum(lengths.to(table.device, torch.long), 0)[:-1]
            ids = values.to(table.device, torch.long)
            pooled.append(F.embedding_bag(ids, table, offsets, mode="sum"))
        return torch.cat(pooled, dim=1) if pooled else torch.zeros(batch_size, 0)

    @torch.no_grad()
    def logits(self, batch: Any) -> torch.Tensor:
        """`[B, T]` logits of `batch` (columns in `tasks` order)."""
        dense_BDn = batch.dense
        if dense_BDn.dim() != 2 or dense_BDn.shape[1] != self.num_dense:
            raise ValueError(f"batch.dense must be [B, {self.num_dense}], got {list(dense_BDn.shape)}")
        B = dense_BDn.shape[0]
        device = next(iter(self.tables.values())).device if self.tables else dense_BDn.device
        x_BD = torch.cat([self.pool(batch.sparse, B), dense_BDn.to(device, torch.float32)], dim=1)
        return self.program(x_BD)

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        """task -> `[B]` logits of `batch` (probabilities: `torch.sigmoid`)."""
        logits_BT = self.logits(batch)
        return {t: logits_BT[:, i] for i, t in enumerate(self.tasks)}

    # -- raw values -> model inputs ---------------------------------------------------

    def encode_ids(self, feature: str, values: list[Any]) -> torch.Tensor:
        """Ids of raw values of `feature` (as their text, trimmed), 0 for empty / unseen."""
        if self.vocab is None:
            raise ValueError("this artifact has no vocab.json")
        if feature not in self._index:
            self._index[feature] = {v: i + 1 for i, v in enumerate(self.vocab[feature])}
        index = self._index[feature]
        return torch.tensor([0 if v is None else index.get(str(v).strip(), 0) for v in values], dtype=torch.long)

    def normalize_dense(self, raw_BDn: torch.Tensor) -> torch.Tensor:
        """Raw dense columns -> the program's inputs: each column's transform
        (`signed_log1p`: sign(x) log1p|x|, `log1p_clamped`: log1p(max(x, 0))), then
        `(x - mean) / std` with the train statistics; NaN (missing) -> 0, the train mean."""
        dense = self.meta["dense"]
        x = raw_BDn.double().clone()
        for j, transform in enumerate(dense["transforms"]):
            if transform == "signed_log1p":
                x[:, j] = torch.sign(x[:, j]) * torch.log1p(x[:, j].abs())
            elif transform == "log1p_clamped":
                x[:, j] = torch.log1p(x[:, j].clamp_min(0))
        mean = torch.tensor(dense["mean"], dtype=torch.float64)
        std = torch.tensor(dense["std"], dtype=torch.float64)
        out = ((x - mean) / std).float()
        return torch.where(torch.isnan(out), torch.zeros((), dtype=out.dtype), out)
