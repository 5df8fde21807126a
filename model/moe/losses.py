"""Load-balancing terms of the SMES layer, as pure functions.

- `balance_loss`: the global multi-gate Switch-style regulariser of SMES,
  `L_lb = E * sum_e f_e * P_e`, pooled over all tasks. `f_e` comes from *counts*
  (no grad) so that the caller can all-reduce them over ranks before `f` is formed;
  `P_e` is the local mean router probability and carries the gradient.
  Normalisation (the paper is silent): `f_e = c_e / sum_e c_e`, the fraction of all
  (instance, task, slot) selections that chose e, so `sum_e f_e = 1` and `L_lb = 1`
  exactly when both f and P are uniform, for any K_s + K_a.
- `router_z_loss`: `mean_{b,t} logsumexp(z_{b,t})^2` (ST-MoE), keeps logits small.
- `bias_update`: the auxiliary-loss-free balancing step (DeepSeek-V3):
  `delta_e = rate * sign(mean_e c - c_e)`, applied to a selection-only bias outside
  the backward pass.

Legend: B instances, T tasks, E experts.
"""

from __future__ import annotations

import torch


def balance_loss(probs_BTE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Global multi-gate load-balancing loss `E * sum_e f_e * P_e`.

    Args:
        probs_BTE: router probabilities (with grad).
        counts_E: selections per expert, pooled over tasks (any float or int dtype;
            detached here), possibly already summed over ranks.

    Returns:
        Scalar; 1.0 for uniform routing.
    """
    counts_E = counts_E.detach().to(probs_BTE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    P_E = probs_BTE.mean(dim=(0, 1))
    return probs_BTE.shape[-1] * (f_E * P_E).sum()


def router_z_loss(logits_BTE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (instance, task) of `logsumexp(z)^2`."""
    return torch.logsumexp(logits_BTE, dim=-1).square().mean()


def bias_update(counts_E: torch.Tensor, *, rate: float) -> torch.Tensor:
    """Bias step of aux-loss-free balancing: raise under-loaded experts, lower over-loaded."""
    counts_E = counts_E.float()
    return rate * torch.sign(counts_E.mean() - counts_E)
