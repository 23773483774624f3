"""A kernel density matrix (KDM) layer for learning from label proportions.

M prototype pairs (c_x, c_y) with weights w: c_x lives in the input space, c_y is a class
distribution, and an RBF kernel of learnable width sigma compares inputs with c_x. A single
chip (a pure state) is predicted as

    p(y | x) = sum_i pi_i(x) c_y,i,   pi_i(x) = w_i k(x, c_x,i) / sum_l w_l k(x, c_x,l),

and a bag (a mixed state: chips x_j with weights alpha_j summing to 1) as

    p(y | bag) = sum_j alpha_j p(y | x_j).

The layer is linear in alpha, so the bag prediction is exactly the weighted mean of the
instance predictions: train on bag proportions, predict single chips with the same layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KDM(nn.Module):
    def __init__(self, prototypes: torch.Tensor, n_classes: int, sigma: float, prototype_labels: torch.Tensor | None = None):
        super().__init__()
        m = prototypes.shape[0]
        self.c_x = nn.Parameter(prototypes.clone().float())
        init = prototype_labels if prototype_labels is not None else torch.full((m, n_classes), 1.0 / n_classes)
        self.c_y_logits = nn.Parameter(torch.log(init.float().clamp_min(1e-4)))
        self.w_logits = nn.Parameter(torch.zeros(m))
        self.log_sigma = nn.Parameter(torch.tensor(float(sigma)).log())

    @classmethod
    def from_data(cls, x: torch.Tensor, n_classes: int, n_prototypes: int = 64, seed: int = 0) -> "KDM":
        """Prototypes initialised from the data; sigma from nearest-neighbour distances between them."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(x.shape[0], generator=g)[: min(n_prototypes, x.shape[0])]
        protos = x[idx].float()
        d = torch.cdist(protos, protos)
        d.fill_diagonal_(float("inf"))
        sigma = float(d.min(dim=1).values.median().clamp_min(1e-3))
        return cls(protos, n_classes, sigma)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    @property
    def c_y(self) -> torch.Tensor:
        return F.softmax(self.c_y_logits, dim=-1)

    def instance(self, x: torch.Tensor) -> torch.Tensor:
        """p(y | x) for each row of x: (n, classes)."""
        d2 = torch.cdist(x.float(), self.c_x).pow(2)
        logits = F.log_softmax(self.w_logits, dim=0)[None] - d2 / (2 * self.sigma**2)
        pi = F.softmax(logits, dim=1)
        return pi @ self.c_y

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """A mixed state: x (n, d) with weights alpha (n,) (uniform if None) -> p(y | bag) (classes,)."""
        p = self.instance(x)
        if alpha is None:
            return p.mean(dim=0)
        alpha = alpha.to(p) / alpha.sum()
        return alpha @ p
