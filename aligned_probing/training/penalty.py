"""The differentiable frozen-probe penalty: mean P(toxic) of the probe(s) on pooled response activations.

The probe's weights are buffers (never parameters), so the optimiser cannot move the probe; the
gradient flows through it into whatever produced the activations (the LoRA weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aligned_probing.training.activations import masked_mean
from aligned_probing.training.probes import ProbeSet


class ProbePenalty(torch.nn.Module):
    """Mean over samples and probes of sigmoid(pooled @ w + b), in [0, 1].

    Args:
        probes: The frozen probe set (one probe, or an ensemble whose probabilities are averaged).
    """

    def __init__(self, probes: ProbeSet) -> None:
        super().__init__()
        self.layer = int(probes.meta["layer"])
        self.register_buffer("weight", torch.as_tensor(probes.weight, dtype=torch.float32))  # (P, d)
        self.register_buffer("bias", torch.as_tensor(probes.bias, dtype=torch.float32))  # (P,)

    def probabilities(self, acts: Tensor, mask: Tensor) -> Tensor:
        """P(toxic) per sample `[batch]` from `acts` [batch, pos, d] pooled over `mask` [batch, pos]."""
        pooled = masked_mean(acts.float(), mask)  # (B, d)
        logits = pooled @ self.weight.T.to(pooled.device) + self.bias.to(pooled.device)  # (B, P)
        return torch.sigmoid(logits).mean(dim=1)

    def forward(self, acts: Tensor, mask: Tensor) -> Tensor:
        """Scalar penalty: mean P(toxic) over the samples that have at least one masked position."""
        probs = self.probabilities(acts, mask)
        has_tokens = mask.sum(dim=1) > 0
        if not bool(has_tokens.any()):
            return probs.sum() * 0.0  # keeps the graph, contributes nothing
        return probs[has_tokens].mean()
