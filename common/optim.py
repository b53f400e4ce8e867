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
        # One kernel per operation over all tensors (torch._foreach_*), not one per parameter; nothing
        # waits for the device: the trust ratios stay tensors.
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            grads = [w.grad for w in params]
            matrices = [i for i, w in enumerate(params) if w.ndim > 1]  # ndim == 1: no decay, no trust ratio
            if matrices:
                w = [params[i] for i in matrices]
                g = torch._foreach_add([grads[i] for i in matrices], w, alpha=group["weight_decay"])  # g + wd·w
                w_norm, g_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(g))
                ratio = group["eta"] * w_norm / g_norm
                ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                torch._foreach_mul_(g, list(ratio.unbind()))  # g · η‖w‖/‖g‖
                for i, g_i in zip(matrices, g):
                    grads[i] = g_i
            for w in params:
                if "mu" not in self.state[w]:
                    self.state[w]["mu"] = torch.zeros_like(w)
            mu = [self.state[w]["mu"] for w in params]
            torch._foreach_mul_(mu, group["momentum"])
            torch._foreach_add_(mu, grads)  # μ ← momentum·μ + g
            torch._foreach_add_(params, mu, alpha=-group["lr"])  # w ← w − lr·μ


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
