"""Pruning at initialization: SNIP, GraSP and SynFlow score weights once, before training."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from torch import nn

from ..backend import unwrap
from ..density import layer_budgets, layer_densities
from ..errors import BidstError
from ..scores import grow_highest
from .base import METHODS, require_choice, require_range
from .simple import Dense

if TYPE_CHECKING:
    from ..engine import Sparsifier


def _scoring_copy(sp: Sparsifier) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A copy of the model to score on, so scoring touches neither the weights' grads nor BN statistics."""
    memo: dict[int, object] = {}
    model = copy.deepcopy(unwrap(sp.model), memo)
    # each weight's copy by identity: a tied weight may be named after another layer, a compiled or DDP model
    # names them with a prefix
    return model, {n: cast(nn.Parameter, memo[id(p)]) for n, p in sp.params.items()}


def _batch(sp: Sparsifier, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    if sp.init_batch is None:
        raise BidstError(f"method {method!r} scores weights on data: pass init_batch=(inputs, targets) to sparsify")
    return sp.init_batch


def _keep_top(sp: Sparsifier, scores: dict[str, torch.Tensor], scope: str, density: float) -> dict[str, torch.Tensor]:
    """Masks that keep the highest scores: globally over the sparse layers, or per layer at the target budgets."""
    sparse = sp.sparse_names()
    masks = {n: torch.ones(sp.numel[n], dtype=torch.bool) for n in sp.params}
    if scope == "layer":
        shapes = {n: tuple(p.shape) for n, p in sp.params.items()}
        budgets = layer_budgets(sp.numel, layer_densities(shapes, density, sp.distribution, sp.dense_names))
        for n in sparse:
            flat = scores[n].flatten().cpu()
            keep = grow_highest(flat, torch.ones_like(flat, dtype=torch.bool), budgets[n])
            masks[n] = torch.zeros_like(masks[n]).index_fill_(0, keep, True)
        return masks
    dense_count = sum(sp.numel[n] for n in sp.params if n not in sparse)
    total = sum(sp.numel.values())
    k = max(len(sparse), round(density * total) - dense_count)
    flat = torch.cat([scores[n].flatten().cpu().double() for n in sparse])
    keep = grow_highest(flat, torch.ones_like(flat, dtype=torch.bool), k)
    chosen = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, keep, True)
    for n, part in zip(sparse, torch.split(chosen, [sp.numel[n] for n in sparse])):
        masks[n] = part
    return masks


def _commit(sp: Sparsifier, masks: dict[str, torch.Tensor]) -> None:
    """Install the chosen masks; their per-layer densities become the layers' targets."""
    sp.set_masks(masks)
    sp.target_densities = {n: sp.budgets[n] / sp.numel[n] for n in sp.params}


@dataclass
class PruneAtInit(Dense):
    """Shared options: masks chosen once at initialisation and never changed."""

    scope: str = "global"  # "global": one ranking over all layers (the papers); "layer": per-layer budgets

    def validate(self) -> None:
        require_choice(self.name, "scope", self.scope, ("global", "layer"))

    def scores(self, sp: Sparsifier) -> dict[str, torch.Tensor]:
        """One saliency score per weight; higher is kept."""
        raise NotImplementedError

    def setup(self, sp: Sparsifier) -> None:
        scores = {n: sp.all_reduce_mean(s.detach().clone()) for n, s in self.scores(sp).items()}
        _commit(sp, _keep_top(sp, scores, self.scope, 1.0 - sp.sparsity))


@METHODS.register("snip")
@dataclass
class SNIP(PruneAtInit):
    """SNIP (Lee et al. 2019): keep the weights with the largest connection sensitivity |g * w|."""

    name: ClassVar[str] = "snip"

    def scores(self, sp: Sparsifier) -> dict[str, torch.Tensor]:
        x, y = _batch(sp, self.name)
        model, params = _scoring_copy(sp)
        sp.loss_fn(model(x), y).backward()
        # under DDP, the gradient of the global batch (the mean of the ranks'), as a single process would see it
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in params.items()}
        return {n: (sp.all_reduce_mean(grads[n]) * p).abs() for n, p in params.items()}


@METHODS.register("grasp")
@dataclass
class GraSP(PruneAtInit):
    """GraSP (Wang et al. 2020): remove the weights whose removal least reduces gradient flow, -w * Hg."""

    name: ClassVar[str] = "grasp"
    temperature: float = 200.0  # logits are divided by this, as in the paper's code

    def scores(self, sp: Sparsifier) -> dict[str, torch.Tensor]:
        x, y = _batch(sp, self.name)
        model, params = _scoring_copy(sp)
        weights = list(params.values())
        loss = sp.loss_fn(model(x) / self.temperature, y)
        grads = [sp.all_reduce_mean(g.detach()) for g in torch.autograd.grad(loss, weights)]  # global batch's g
        loss = sp.loss_fn(model(x) / self.temperature, y)
        z = torch.autograd.grad(loss, weights, create_graph=True)
        hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(z, grads)), weights)
        # GraSP prunes the largest -w*Hg, so the kept (highest) score is w*Hg
        return {n: (p * h).detach() for (n, p), h in zip(params.items(), hg)}


@METHODS.register("synflow")
@dataclass
class SynFlow(PruneAtInit):
    """SynFlow (Tanaka et al. 2020): iterative data-free pruning by synaptic flow |w * dR/dw|."""

    name: ClassVar[str] = "synflow"
    iterations: int = 100  # pruning rounds on an exponential density schedule

    def validate(self) -> None:
        super().validate()
        require_range(self.name, "iterations", self.iterations, 1, 10_000)

    def setup(self, sp: Sparsifier) -> None:
        x, _ = _batch(sp, self.name)
        if not x.is_floating_point():
            raise BidstError(f"synflow feeds the model an all-ones float input shaped like init_batch's, which a model "
                             f"taking {x.dtype} inputs (token ids, say) cannot use: choose snip or grasp")
        model, params = _scoring_copy(sp)
        model.double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
        original = {n: p.detach().clone() for n, p in params.items()}
        ones = torch.ones((1, *x.shape[1:]), dtype=torch.float64, device=x.device)
        masks = {n: torch.ones(sp.numel[n], dtype=torch.bool) for n in sp.params}
        final = 1.0 - sp.sparsity
        for i in range(1, self.iterations + 1):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(original[n] * masks[n].view_as(p).to(p.device))
            model.zero_grad()
            model(ones).sum().backward()
            scores = {n: sp.all_reduce_mean((p.grad * p).abs().detach().clone()) for n, p in params.items()}
            masks = _keep_top(sp, scores, self.scope, final ** (i / self.iterations))
        _commit(sp, masks)
