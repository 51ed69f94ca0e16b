"""PyTorch twin of DISC (cfjax.methods.disc) for one fixed benchmark configuration.

The classifier is cfjax's BatchNorm CNN (``cfjax.models.classifier``, arch "cnn") in plain
torch (NCHW), weights and running statistics copied from a cfjax checkpoint; FrEIA plays no
part (it has no ordinary classifiers). The optimisation is :func:`cfjax.methods.disc.generate`
with :data:`BENCH_CONFIG`:

- pixels prior ``x = sigmoid(logit(clip(query, 1e-3, 1 - 1e-3)) + delta)``, delta = 0 at start;
- one cross-entropy stage (``progressive=False``) of ``steps`` Adam steps (lr 0.1, betas
  0.9/0.999, eps 1e-8) with optax's cosine decay to 2% of the rate;
- per-example loss  CE(target) + 0.01 BN-statistics (per image, first layer x10, the layers
  with spatial axes) + 1.0 TV (4 directions) + 0.05 l2 + 0.5 l1 to the query; no DUQ or
  feature term (``duq=None``, ``lambda_feat=0``);
- the best iterate reaching the target with margin 0.2 is kept, else the last iterate.

Examples are independent (per-image BN statistics), so the batch is one tensor and the summed
loss gives each example the gradient of its own loss, exactly what cfjax's ``vmap`` computes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfjax.errors import CfjaxError


def bench_config(steps: int):
    """The DISC configuration both sides run (pixels prior, one CE stage, no DUQ, no jitter)."""
    from cfjax.methods.disc import DISCConfig

    return DISCConfig(prior="pixels", progressive=False, steps=int(steps), fit_steps=0, jitter=0)


class TwinCNN(nn.Module):
    """cfjax's "cnn" classifier in eval mode. ``forward(x, capture)`` with x (B, C, H, W) ->
    logits (B, classes), plus the inputs of bn1..bn4 (B, F, h, w) when ``capture``."""

    def __init__(self, variables: dict, config):
        super().__init__()
        if config.arch != "cnn":
            raise CfjaxError(f"the torch DISC twin covers the 'cnn' classifier only, not {config.arch!r}")
        p = {k: _np(v) for k, v in variables["params"].items()}
        s = {k: _np(v) for k, v in variables["batch_stats"].items()}
        self.convs = nn.ParameterList(
            [nn.Parameter(torch.as_tensor(np.transpose(p[f"conv{i}"]["kernel"], (3, 2, 0, 1)).copy()), requires_grad=False) for i in range(1, 5)]
        )
        self.bn = []
        for i in range(1, 6):
            name = f"bn{i}"
            self.bn.append(tuple(torch.from_numpy(np.array(a, np.float32, copy=True)) for a in (s[name]["mean"], s[name]["var"], p[name]["scale"], p[name]["bias"])))
        h, w, _ = config.image_shape
        hh, ww, cc = h // 4, w // 4, 2 * config.width
        k = p["fc1"]["kernel"]  # (hh*ww*cc in NHWC order, hidden)
        k = k.reshape(hh, ww, cc, -1).transpose(2, 0, 1, 3).reshape(hh * ww * cc, -1)  # NCHW flatten order
        self.fc1 = torch.as_tensor(k.T.copy())
        self.head_w = torch.as_tensor(p["head"]["kernel"].T.copy())
        self.head_b = torch.as_tensor(p["head"]["bias"].copy())

    @staticmethod
    def _bn(h, stats):
        mean, var, scale, bias = stats
        return F.batch_norm(h, mean, var, scale, bias, training=False, eps=1e-5)

    def forward(self, x, capture: bool = False):
        bn_inputs = []
        h = x
        for i, w in enumerate(self.convs):
            h = F.conv2d(h, w, padding=1)
            if capture:
                bn_inputs.append(h)
            h = F.relu(self._bn(h, self.bn[i]))
            if i % 2 == 1:
                h = F.max_pool2d(h, 2, 2)
        h = F.linear(h.flatten(1), self.fc1)
        h = F.relu(self._bn(h, self.bn[4]))
        logits = F.linear(h, self.head_w, self.head_b)
        return (logits, bn_inputs) if capture else logits


def _np(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def _safe_norm(v):
    return torch.sqrt((v * v).sum(-1) + 1e-20)


def objective(model: TwinCNN, cfg, x, xq, target):
    """Per-example DISC loss (B,) and probabilities (B, classes) for images x (B, C, H, W)."""
    logits, bn_inputs = model(x, capture=True)
    ce = -torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
    per_ex = cfg.lambda_cf * ce
    if cfg.lambda_tv > 0:
        def msq(d):
            return (d * d).mean((1, 2, 3))

        per_ex = per_ex + cfg.lambda_tv * (
            msq(x[:, :, :, 1:] - x[:, :, :, :-1]) + msq(x[:, :, 1:, :] - x[:, :, :-1, :])
            + msq(x[:, :, 1:, 1:] - x[:, :, :-1, :-1]) + msq(x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
        )
    if cfg.lambda_l2 > 0:
        per_ex = per_ex + cfg.lambda_l2 * (x * x).mean((1, 2, 3))
    if cfg.lambda_l1 > 0:
        per_ex = per_ex + cfg.lambda_l1 * (x - xq).abs().mean((1, 2, 3))
    if cfg.lambda_bn > 0:
        bn = 0.0
        for i, h in enumerate(bn_inputs):
            m_run, v_run = model.bn[i][0], model.bn[i][1]
            mu = h.mean((2, 3))
            var = ((h - mu[:, :, None, None]) ** 2).mean((2, 3))
            wgt = cfg.first_bn_weight if i == 0 else 1.0
            bn = bn + wgt * (_safe_norm(mu - m_run) + _safe_norm(var - v_run))
        per_ex = per_ex + cfg.lambda_bn * bn
    return per_ex, torch.softmax(logits, -1)


def _reaches(probs, target, margin):
    pt = probs.gather(1, target[:, None])[:, 0]
    others = probs.masked_fill(F.one_hot(target, probs.shape[-1]).bool(), -math.inf)
    return pt - others.max(-1).values >= margin


def generate(model: TwinCNN, cfg, xq: torch.Tensor, target: torch.Tensor) -> dict:
    """DISC with the pixels prior, one CE stage: xq (B, C, H, W) in [0, 1], target (B,) ->
    {x_cf, success, probs_cf, loss_first (B,) (the loss at the start), loss_last (B,)}."""
    if cfg.prior != "pixels" or cfg.progressive or cfg.lambda_feat > 0 or cfg.bn_convention != "image" or cfg.schedule != "cosine":
        raise CfjaxError("the torch DISC twin covers the benchmark configuration only (see bench_config)")
    eps = 1e-3
    q = xq.clamp(eps, 1 - eps)
    base = torch.log(q) - torch.log1p(-q)
    delta = torch.zeros_like(xq, requires_grad=True)
    lr0 = 0.1 if cfg.lr is None else cfg.lr
    steps = cfg.steps
    opt = torch.optim.Adam([delta], lr=lr0, betas=cfg.betas, eps=1e-8)
    with torch.no_grad():
        x0 = torch.sigmoid(base)
        per0, _ = objective(model, cfg, x0, xq, target)
    best_loss = torch.full_like(per0, math.inf)
    best_x = x0.clone()
    found = torch.zeros_like(per0, dtype=torch.bool)

    def update_best(per_ex, probs, x):
        nonlocal best_loss, best_x, found
        ok = _reaches(probs, target, cfg.margin)
        better = ok & (per_ex < best_loss)
        best_loss = torch.where(better, per_ex, best_loss)
        best_x = torch.where(better[:, None, None, None], x, best_x)
        found = found | ok

    for k in range(steps):
        for g in opt.param_groups:  # optax.cosine_decay_schedule(lr, steps, alpha=0.02) at count k
            g["lr"] = lr0 * ((1 - 0.02) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)) + 0.02)
        x = torch.sigmoid(base + delta)
        per_ex, probs = objective(model, cfg, x, xq, target)
        opt.zero_grad(set_to_none=True)
        per_ex.sum().backward()
        with torch.no_grad():
            update_best(per_ex.detach(), probs.detach(), x.detach())
        opt.step()
    with torch.no_grad():
        x = torch.sigmoid(base + delta)
        per_ex, probs = objective(model, cfg, x, xq, target)
        update_best(per_ex, probs, x)
        x_cf = torch.where(found[:, None, None, None], best_x, x)
        probs_cf = torch.softmax(model(x_cf), -1)
    return {"x_cf": x_cf, "success": _reaches(probs_cf, target, cfg.margin), "probs_cf": probs_cf, "loss_first": per0, "loss_last": per_ex}
