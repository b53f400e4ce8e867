"""LARS and the learning-rate schedules the papers use."""
import math

import torch


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR, BYOL, Barlow Twins and VICReg:

        g ← g + wd·w;  g ← g · η‖w‖/‖g‖ (1 where either norm is 0);  μ ← momentum·μ + g;  w ← w − lr·μ

    Parameters with ndim == 1 (biases and BatchNorm) skip both the decay and the trust ratio.
    The official optimisers of BYOL, Barlow Twins and VICReg take exactly this step. Two variants,
    each chosen by the method that uses it:

    * lr_in_momentum (SimCLR's TF LARS, `classic_momentum`): μ ← momentum·μ + lr·g;  w ← w − μ.
      The same step while the lr is constant; while it changes (warmup, cosine) the buffer carries
      the past steps at their own lr instead of at today's.
    * clip_lr (solo-learn's LARS with `clip_lr`, NVIDIA apex's LARC): the ratio is
      η‖w‖/(‖g‖ + wd·‖w‖ + 1e-8) with g the gradient before the decay, clipped to at most lr as a
      layer rate: g ← (g + wd·w) · min(ratio/lr, 1); where either norm is 0, g is left as it is
      (no decay either)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001, lr_in_momentum=False,
                 clip_lr=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      lr_in_momentum=lr_in_momentum, clip_lr=clip_lr))

    @staticmethod
    def _scaled(w, g, group):
        """The matrices' decayed and trust-scaled gradients (a new list)."""
        wd, eta = group["weight_decay"], group["eta"]
        w_norm = torch.stack(torch._foreach_norm(w))
        if group.get("clip_lr"):  # solo-learn / apex LARC (.get: checkpoints from before the option)
            g_norm = torch.stack(torch._foreach_norm(g))
            valid = (w_norm > 0) & (g_norm > 0)
            ratio = eta * w_norm / (g_norm + wd * w_norm + 1e-8)
            ratio = torch.clamp(ratio / group["lr"], max=1.0) if group["lr"] > 0 else torch.ones_like(ratio)
            d = torch._foreach_mul(w, list((wd * valid.to(w_norm.dtype)).unbind()))  # wd·w where both norms are > 0, else 0
            torch._foreach_add_(d, g)
        else:
            d = torch._foreach_add(g, w, alpha=wd)  # g + wd·w
            d_norm = torch.stack(torch._foreach_norm(d))
            valid = (w_norm > 0) & (d_norm > 0)
            ratio = eta * w_norm / d_norm  # η‖w‖/‖g‖
        ratio = torch.where(valid, ratio, torch.ones_like(ratio))
        torch._foreach_mul_(d, list(ratio.unbind()))
        return d

    @torch.no_grad()
    def step(self):
        # One kernel per operation over all tensors (torch._foreach_*), not one per parameter; nothing
        # waits for the device: the trust ratios stay tensors.
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            grads = [w.grad for w in params]
            matrices = [i for i, w in enumerate(params) if w.ndim > 1]  # ndim == 1: no decay, no trust ratio
            if matrices:
                scaled = self._scaled([params[i] for i in matrices], [grads[i] for i in matrices], group)
                for i, g_i in zip(matrices, scaled):
                    grads[i] = g_i
            for w in params:
                if "mu" not in self.state[w]:
                    self.state[w]["mu"] = torch.zeros_like(w)
            mu = [self.state[w]["mu"] for w in params]
            torch._foreach_mul_(mu, group["momentum"])
            if group.get("lr_in_momentum"):
                torch._foreach_add_(mu, grads, alpha=group["lr"])  # μ ← momentum·μ + lr·g
                torch._foreach_sub_(params, mu)  # w ← w − μ
            else:
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
