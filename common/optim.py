"""LARS and the learning-rate schedules the papers use."""
import math

import torch


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR, BYOL, Barlow Twins and VICReg:

        g ← g + wd·w;  g ← g · η‖w‖/‖g‖ (1 where either norm is 0);  μ ← momentum·μ + g;  w ← w − lr·μ

    Parameters with ndim == 1 (biases and BatchNorm) skip both the decay and the trust ratio."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if w.ndim > 1:
                    g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
                    ratio = group["eta"] * w_norm / g_norm
                    g = g * torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[w]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(w)
                mu = state["mu"].mul_(group["momentum"]).add_(g)
                w.add_(mu, alpha=-group["lr"])


def cosine(t, total, base, final=0.0):
    """base at t = 0, final at t = total, half a cosine in between."""
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


def warmup_cosine(step, total, warmup, base, final=0.0):
    """Linear warmup from 0 to `base` over `warmup` steps, then cosine to `final` at `total`."""
    if step < warmup:
        return base * step / warmup
    return cosine(step - warmup, max(total - warmup, 1), base, final)


def set_lr(optimizer, lr):
    """Set every group's lr; a group with `fixed_lr` keeps the lr it was built with."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("fixed_lr", lr)
