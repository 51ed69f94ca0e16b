"""PyTorch twin of cfjax's ECINN generative classifier (Glow + class-conditional Gaussians).

Built from FrEIA 0.2 blocks inside a ``FrEIA.framework.SequenceINN`` wherever FrEIA computes a
layer exactly as cfjax does; tensors are NCHW (torch's native layout), cfjax's are NHWC.

=============================  ============================================================
cfjax layer                    twin
=============================  ============================================================
Haar downsampling              ``Fm.HaarDownsampling(order_by_wavelet=True)``: same filters,
                               same 1/2 factor, channel order wavelet-major like cfjax's.
ActNorm                        ``Fm.ActNorm`` (``x * exp(scale) + bias``: cfjax's formula),
                               data-dependent init switched off, parameters copied.
LU 1x1 conv (inference)        ``Fm.Fixed1x1Conv(M = W^T)``: FrEIA convolves with ``M^T``, so
                               the per-pixel map is ``W x``; its inverse uses ``inverse(W)``
                               instead of cfjax's two triangular solves (same function, float32
                               round-off only).
LU 1x1 conv (training)         plain torch (:class:`LUConv1x1`, a FrEIA ``InvertibleModule``):
                               FrEIA 0.2 has no learnable LU-parametrised 1x1 convolution
                               (``Fixed1x1Conv`` is frozen), and the gradients must flow into
                               the same L, U, log|s| parameters as cfjax's.
affine coupling                ``Fm.AffineCouplingOneSided`` with ``clamp`` = cfjax's and a
                               custom ``clamp_activation`` ``u -> (2/pi) atan(u / clamp)``:
                               FrEIA's built-in "ATAN" uses ``0.636 atan(u)`` (0.1% off 2/pi and
                               no division by the clamp), which is not cfjax's soft clamp. The
                               subnet's last conv emits (log-scale, shift) in FrEIA's order, so
                               cfjax's (shift, log-scale) output channels are swapped on copy.
preprocessing 2x - 1, latent   plain torch (not flow layers): the same formulas as
Gaussians, IB-INN loss, ECINN  ``cfjax.models.latent``, ``flow_classifier`` and
                               ``cfjax.methods.ecinn``.
=============================  ============================================================

The latent is flattened in cfjax's order (NHWC, C-order), so the class means and ``mu`` are
used as they are. Only Haar downsampling without factor-out (``split=False``: the shipped
model) is twinned.
"""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfjax.errors import CfjaxError

_T = lambda a: torch.from_numpy(np.array(a, np.float32, copy=True))  # noqa: E731 - a copy: never a view of a JAX buffer


class LUConv1x1(Fm.InvertibleModule):
    """Learnable invertible 1x1 convolution ``W = P L (U + diag(sign exp(log_abs_s)))`` (plain torch).

    Same parametrisation as ``cfjax.models.flows.conv1x1``: only the strict triangles of
    ``lower`` / ``upper`` are used; ``perm`` and ``sign`` are constant buffers.
    """

    def __init__(self, dims_in, dims_c=None, p: dict | None = None):
        super().__init__(dims_in, dims_c)
        c = dims_in[0][0]
        p = p or {}
        perm = np.asarray(p.get("perm", np.eye(c)), np.float32)
        self.register_buffer("perm", torch.as_tensor(np.eye(c, dtype=np.float32)[np.argmax(perm, axis=1)]))
        self.register_buffer("sign", torch.where(_T(p.get("sign", np.ones(c))) < 0, -1.0, 1.0))
        self.lower = nn.Parameter(_T(p.get("lower", np.zeros((c, c)))))
        self.upper = nn.Parameter(_T(p.get("upper", np.zeros((c, c)))))
        self.log_abs_s = nn.Parameter(_T(p.get("log_abs_s", np.zeros(c))))
        self.register_buffer("eye", torch.eye(c))

    def _factors(self):
        lower = torch.tril(self.lower, -1) + self.eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_abs_s))
        return lower, upper

    def forward(self, x, rev=False, jac=True):
        lower, upper = self._factors()
        hw = x[0].shape[2] * x[0].shape[3]
        ld = (hw * self.log_abs_s.sum()).expand(x[0].shape[0])
        if not rev:
            w = self.perm @ lower @ upper
            return (F.conv2d(x[0], w[:, :, None, None]),), ld
        linv_pt = torch.linalg.solve_triangular(lower, self.perm.T, upper=False, unitriangular=True)
        w_inv = torch.linalg.solve_triangular(upper, linv_pt, upper=True)
        return (F.conv2d(x[0], w_inv[:, :, None, None]),), -ld

    def output_dims(self, input_dims):
        return input_dims


def _subnet(hidden: int, p: dict | None):
    """cfjax's coupling subnet conv3x3-ReLU-conv1x1-ReLU-conv3x3, weights from cfjax params ``p``."""

    def make(c_in: int, c_out: int) -> nn.Module:
        net = nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, c_out, 3, padding=1),
        )
        if p is not None:
            c_b = c_out // 2
            w3, b3 = np.asarray(p["conv3"]["w"]), np.asarray(p["conv3"]["b"])
            # cfjax emits (shift, log-scale); FrEIA reads (log-scale, shift).
            w3 = np.concatenate([w3[..., c_b:], w3[..., :c_b]], -1)
            b3 = np.concatenate([b3[c_b:], b3[:c_b]])
            with torch.no_grad():
                for conv, (w, b) in zip((net[0], net[2], net[4]), ((p["conv1"]["w"], p["conv1"]["b"]), (p["conv2"]["w"], p["conv2"]["b"]), (w3, b3))):
                    conv.weight.copy_(_T(np.transpose(np.asarray(w), (3, 2, 0, 1))))  # HWIO -> OIHW
                    conv.bias.copy_(_T(b))
        return net

    return make


def _soft_clamp(clamp: float):
    return lambda u: (2.0 / math.pi) * torch.atan(u / clamp)


class TwinFlowClassifier(nn.Module):
    """The ECINN model in torch: ``encode`` x (B, C, H, W) in [0, 1] -> (z (B, D), logdet (B,)),
    ``decode`` z (B, D) -> x (B, C, H, W); ``mu``, ``class_means`` (C, D); ``logit_prior`` (C,).

    ``trainable=True`` uses :class:`LUConv1x1` (learnable) instead of ``Fm.Fixed1x1Conv``.
    """

    def __init__(self, params: dict, config, trainable: bool = False):
        super().__init__()
        g = config.glow
        if g.downsample != "haar" or g.split:
            raise CfjaxError("the torch twin covers Haar downsampling without factor-out (the shipped flow) only")
        if config.preprocess != "affine":
            raise CfjaxError("the torch twin covers the affine preprocessing (the shipped flow) only")
        self.config = config
        h, w, c = g.image_shape
        self.image_shape = (c, h, w)
        inn = Ff.SequenceINN(c, h, w)
        for lvl in range(g.num_levels):
            inn.append(Fm.HaarDownsampling, order_by_wavelet=True)
            lp = jax_to_np(params["glow"][f"level{lvl}"])
            for i in range(g.steps_per_level):
                sp = _index(lp, i)
                inn.append(Fm.ActNorm)
                an = inn.module_list[-1]
                with torch.no_grad():
                    an.scale.copy_(_T(sp["actnorm"]["log_scale"]).view_as(an.scale))
                    an.bias.copy_(_T(sp["actnorm"]["bias"]).view_as(an.bias))
                an.init_on_next_batch = False
                if trainable:
                    inn.append(LUConv1x1, p=sp["conv1x1"])
                else:
                    w_mat = _lu_weight(sp["conv1x1"])
                    inn.append(Fm.Fixed1x1Conv, M=torch.as_tensor(w_mat.T.copy()))
                inn.append(
                    Fm.AffineCouplingOneSided,
                    subnet_constructor=_subnet(g.hidden_at(lvl), sp["coupling"]),
                    clamp=g.coupling_clamp,
                    clamp_activation=_soft_clamp(g.coupling_clamp),
                )
        self.inn = inn
        self.out_shape = inn.shapes[-1] if hasattr(inn, "shapes") else None
        lat = jax_to_np(params["latent"])
        self.mu = nn.Parameter(_T(lat["mu"]), requires_grad=trainable)
        self.register_buffer("logit_prior", _T(lat["logit_prior"]))
        self.register_buffer("class_means", _T(np.asarray(params["class_means"])))
        self.dim = h * w * c
        hh, ww, cc = g.level_shapes()[-1]
        self.latent_chw = (cc, hh, ww)

    # -- the flow --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor):
        """x (B, C, H, W) in [0, 1] -> (z (B, D) in cfjax's NHWC order, log|det dz/dx| (B,))."""
        u = 2.0 * x - 1.0
        out, logdet = self.inn(u)
        z = out.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return z, logdet + self.dim * math.log(2.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> x (B, C, H, W), not clipped."""
        c, h, w = self.latent_chw
        out = z.reshape(z.shape[0], h, w, c).permute(0, 3, 1, 2).contiguous()
        u, _ = self.inn(out, rev=True, jac=False)
        return 0.5 * (u + 1.0)

    # -- the latent Gaussians (cfjax.models.latent) ------------------------------------------
    def squared_distances(self, z: torch.Tensor) -> torch.Tensor:
        mu = self.mu
        d2 = (z * z).sum(-1, keepdim=True) - 2.0 * z @ mu.T + (mu * mu).sum(-1)[None, :]
        return torch.clamp(d2, min=0.0)

    def class_logits_z(self, z: torch.Tensor) -> torch.Tensor:
        logits = -0.5 * self.squared_distances(z)
        if self.config.latent.use_prior_at_test:
            logits = logits + torch.log_softmax(self.logit_prior, -1)[None, :]
        return logits


def jax_to_np(tree):
    import jax

    return jax.tree_util.tree_map(np.asarray, tree)


def _index(tree, i):
    import jax

    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _lu_weight(p: dict) -> np.ndarray:
    c = p["log_abs_s"].shape[0]
    perm = np.eye(c, dtype=np.float64)[np.argmax(p["perm"], axis=1)]
    lower = np.tril(p["lower"], -1) + np.eye(c)
    sign = np.where(p["sign"] < 0, -1.0, 1.0)
    upper = np.triu(p["upper"], 1) + np.diag(sign * np.exp(np.asarray(p["log_abs_s"], np.float64)))
    return (perm @ lower @ upper).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# ECINN (cfjax.methods.ecinn) in torch.

STEP_RULES = {
    "paper": lambda a0: a0 + 0.8 * (1.0 - a0),
    "code": lambda a0: 0.8 + 0.5 * a0,
    "full": lambda a0: torch.ones_like(a0),
    "short": lambda a0: a0 + 0.3 * (1.0 - a0),
}


def latent_step(model, z, source, target, step="short"):
    """cfjax.methods.ecinn.latent_step with direction="predicted_means": (z_cf, alpha0, alpha);
    ``step`` a key of :data:`STEP_RULES` or a function of alpha0."""
    mu, means = model.mu, model.class_means
    d = means[target] - means[source]
    dmu = mu[target] - mu[source]
    same = source == target
    norm = torch.linalg.norm(dmu, dim=-1)
    w = dmu / torch.where(same, torch.ones_like(norm), norm)[:, None]
    b = -0.5 * ((mu[source] + mu[target]) * w).sum(-1)
    wd = (w * d).sum(-1)
    alpha0 = (-b - (w * z).sum(-1)) / torch.where(same | (wd == 0), torch.ones_like(wd), wd)
    alpha = (STEP_RULES[step] if isinstance(step, str) else step)(alpha0)
    alpha = torch.where(same, torch.zeros_like(alpha), alpha)
    alpha0 = torch.where(same, torch.zeros_like(alpha0), alpha0)
    return z + alpha[:, None] * d, alpha0, alpha


# Search rules (cfjax.methods.ecinn.SEARCH_RULES): candidate rules farthest first, and the mean
# out-of-range tolerance; refinement rounds step by the last candidate.
_ADAPTIVE = (lambda a0: 1.2 + 0.5 * a0, lambda a0: 1.0 + 0.5 * a0, STEP_RULES["code"])
SEARCH_RULES = {"adaptive": (_ADAPTIVE, 0.03),
                "adaptive-wide": (_ADAPTIVE + (lambda a0: 0.6 + 0.5 * a0, lambda a0: 0.4 + 0.5 * a0), 0.03)}


def step_and_decode(model, z, source, target, step="short"):
    """cfjax.methods.ecinn.step_and_decode (predicted means): x_cf (B, C, H, W) clipped, for a step
    rule or a search rule (candidates farthest first, each decoded only for the queries whose
    decodes so far all left the pixel range: exactly those rows, eager PyTorch takes any shape)."""
    if not (isinstance(step, str) and step in SEARCH_RULES):
        z_cf, _, _ = latent_step(model, z, source, target, step)
        return torch.clamp(model.decode(z_cf), 0.0, 1.0)
    rules, tolerance = SEARCH_RULES[step]
    x_cf = None
    todo = torch.arange(z.shape[0])
    for k, rule in enumerate(rules):
        z_k, _, _ = latent_step(model, z[todo], source[todo], target[todo], rule)
        x_raw = model.decode(z_k)
        ok = ((x_raw - torch.clamp(x_raw, 0.0, 1.0)).abs().mean((1, 2, 3)) <= tolerance) | (k == len(rules) - 1)
        if x_cf is None:
            x_cf = torch.empty_like(x_raw)
        x_cf[todo[ok]] = torch.clamp(x_raw[ok], 0.0, 1.0)
        todo = todo[~ok]
        if todo.numel() == 0:
            break
    return x_cf


@torch.inference_mode()
def ecinn_next_class(model, x: torch.Tensor, step: str = "short", refine: int = 2) -> dict:
    """ECINN counterfactuals to the next class ((predicted + 1) mod C), refinement as in cfjax:
    x (B, C, H, W) in [0, 1] -> {x_cf (B, C, H, W), y_pred, target, z, rounds}. ``model``: a
    :class:`TwinFlowClassifier` or a ``benchmarks.twins.ibinn.TwinIBINNClassifier``; ``step``: a
    key of :data:`STEP_RULES` or :data:`SEARCH_RULES`. As in cfjax, the counterfactuals are
    checked once, the rounds stop when every query is at its target, and a round moves only the
    queries not yet there (here exactly those: eager PyTorch takes any sub-batch shape)."""
    n_cls = model.mu.shape[0]
    z, _ = model.encode(x)
    y_pred = torch.argmax(model.class_logits_z(z), -1)
    target = (y_pred + 1) % n_cls
    x_cf = step_and_decode(model, z, y_pred, target, step)
    round_step = SEARCH_RULES[step][0][-1] if isinstance(step, str) and step in SEARCH_RULES else step
    rounds = torch.zeros_like(y_pred, dtype=torch.int32)
    if refine:
        z1, _ = model.encode(x_cf)
        p1 = torch.argmax(model.class_logits_z(z1), -1)
        for _ in range(int(refine)):
            todo = torch.nonzero((p1 != target) & (y_pred != target)).flatten()
            if todo.numel() == 0:
                break
            x2 = step_and_decode(model, z1[todo], p1[todo], target[todo], round_step)
            z2, _ = model.encode(x2)
            x_cf[todo], z1[todo], p1[todo] = x2, z2, torch.argmax(model.class_logits_z(z2), -1)
            rounds[todo] += 1
    return {"x_cf": x_cf, "y_pred": y_pred, "target": target, "z": z, "rounds": rounds}


# ----------------------------------------------------------------------------------------------
# IB-INN training (cfjax.models.latent.ib_loss, flow_classifier.loss_fn, train_flow.make_optimizer).


def dequantize(x: torch.Tensor, bins: int, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + U(0, 1/bins) + sigma N(0, 1), reflected into [0, 1] (cfjax's dequantize, torch RNG)."""
    u = torch.rand(x.shape, generator=generator) / bins
    y = torch.abs(x + u + sigma * torch.randn(x.shape, generator=generator))
    return 1.0 - torch.abs(1.0 - y)


def ib_loss(model: TwinFlowClassifier, z, logdet, labels):
    """IB-INN loss (train_prior=False): (loss, l_x mean, l_y mean)."""
    cfg = model.config.latent
    dim = z.shape[-1]
    lp = torch.log_softmax(model.logit_prior, -1)
    logits = -0.5 * model.squared_distances(z) + lp[None, :]
    l_x = (-(torch.logsumexp(logits, -1) - 0.5 * dim * math.log(2 * math.pi)) - logdet) / dim
    onehot = F.one_hot(labels, cfg.num_classes).to(z.dtype)
    smooth = onehot * (1 - cfg.label_smoothing) + cfg.label_smoothing / cfg.num_classes
    l_y = (smooth * (torch.log_softmax(logits, -1) - lp[None, :])).sum(-1)
    beta = cfg.beta
    loss = (2.0 / (1 + beta) * l_x - 2.0 * beta / (1 + beta) * l_y).mean()
    return loss, l_x.mean(), l_y.mean()


def warmup_cosine(step: int, lr: float, total_steps: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, total, 0.02 lr) as cfjax's make_optimizer sets it."""
    warmup = max(1, min(200, total_steps // 10))
    decay_steps = max(total_steps, warmup + 1)
    end = lr * 0.02
    if step < warmup:
        return lr * step / warmup
    t = min(step - warmup, decay_steps - warmup) / (decay_steps - warmup)
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * t))


class TwinTrainer:
    """cfjax's flow training step in torch: clip global norm 10, AdamW (wd 1e-5) on the flow,
    Adam at 10x the rate on the class Gaussians' means, warm-up + cosine schedule."""

    def __init__(self, model: TwinFlowClassifier, lr: float, total_steps: int, clip: float = 10.0, mean_lr_factor: float = 10.0):
        self.model, self.lr, self.total, self.clip, self.factor = model, lr, total_steps, clip, mean_lr_factor
        flow_params = [p for p in model.inn.parameters() if p.requires_grad]
        self.flow_params = flow_params
        self.opt_flow = torch.optim.AdamW(flow_params, lr=0.0, weight_decay=1e-5, eps=1e-8)
        self.opt_mu = torch.optim.Adam([model.mu], lr=0.0, eps=1e-8)
        self.step_count = 0

    def step(self, x: torch.Tensor, labels: torch.Tensor, noise: bool = True, generator=None) -> float:
        """One update on x (B, C, H, W) in [0, 1] (dequantised here unless ``noise=False``)."""
        cfg = self.model.config
        if noise:
            x = dequantize(x, cfg.dequantize_bins, cfg.noise_sigma, generator)
        z, logdet = self.model.encode(x)
        loss, _, _ = ib_loss(self.model, z, logdet, labels)
        self.opt_flow.zero_grad(set_to_none=True)
        self.opt_mu.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.flow_params + [self.model.mu], self.clip)
        lr = warmup_cosine(self.step_count, self.lr, self.total)
        for g in self.opt_flow.param_groups:
            g["lr"] = lr
        for g in self.opt_mu.param_groups:
            g["lr"] = self.factor * lr
        self.opt_flow.step()
        self.opt_mu.step()
        self.step_count += 1
        return loss.detach()
