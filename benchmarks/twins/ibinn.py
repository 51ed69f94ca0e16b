"""PyTorch twin of cfjax's IB-INN flow classifier (``cfjax.models.ibinn`` + the class Gaussians),
in eval mode: the network behind ``cfjax/pretrained/mnist5k_flow`` and ``cfjax explain ecinn``.

Plain torch, NCHW (torch's native layout; cfjax's is NHWC). FrEIA has an all-in-one block, but
not this one: cfjax's AIO block clamps the log-scale with ``clamp * tanh(0.1 a)`` and applies a
fixed global scale after the rotation, FrEIA's uses an atan clamp and a learned global affine; so
every layer is written out here from ``cfjax.models.ibinn``'s docstring formulas:

=============================  ============================================================
cfjax                          twin
=============================  ============================================================
Haar 2x2 (wavelet-major)       the same four sums over strided slices, ``torch.cat`` on dim 1
AIO block                      ``F.conv2d`` (weights HWIO -> OIHW), eval BatchNorm with the
                               running statistics (same formula, same eps), fixed rotation
                               ``Q`` as ``einsum('bchw,dc->bdhw')``
downsampling coupling          strided subnet (second conv stride 2, padding 1) and low-res
                               subnet; cfjax's 2x2 squeeze, channel order (dy, dx, c)
DCT pooling + dense coupling   the orthonormal DCT-II matrix of ``cfjax.models.ibinn.dct_matrix``
                               and the same fixed permutation, flattened in cfjax's (k_h, k_w, c)
                               order; two-layer ReLU MLPs with the atan clamp
preprocessing, Gaussians       ``2x - 1``; the latent is cfjax's flat vector, so ``mu`` and the
                               class means are used as they are
=============================  ============================================================

The fixed transforms (rotations, permutation, DCT) are taken from cfjax's own functions of the
config, so both sides use the same matrices. ``encode``/``decode``/``mu``/``class_means``/
``class_logits_z`` match :class:`benchmarks.twins.flow.TwinFlowClassifier`, so
:func:`benchmarks.twins.flow.ecinn_next_class` runs ECINN on either.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfjax.errors import CfjaxError

_T = lambda a: torch.from_numpy(np.array(a, np.float32, copy=True))  # noqa: E731 - a copy: never a view of a JAX buffer


def _oihw(w) -> torch.Tensor:
    return _T(np.transpose(np.asarray(w), (3, 2, 0, 1)))


class _Subnet(nn.Module):
    """[ReLU] conv3x3 - BN - ReLU - conv3x3 (stride) - BN - ReLU - conv1x1 (+bias), eval mode."""

    def __init__(self, p: dict, stats: dict, eps: float, relu_first: bool, stride: int = 1):
        super().__init__()
        self.relu_first, self.stride, self.eps = relu_first, stride, eps
        self.register_buffer("w1", _oihw(p["conv1"]))
        self.register_buffer("w2", _oihw(p["conv2"]))
        self.register_buffer("w3", _oihw(p["conv3"]["w"]))
        self.register_buffer("b3", _T(p["conv3"]["b"]))
        self.bn = []
        for i, name in enumerate(("norm1", "norm2")):
            if "scale" in p[name]:
                for k, v in (("mean", stats[name]["mean"]), ("var", stats[name]["var"]), ("scale", p[name]["scale"]), ("bias", p[name]["bias"])):
                    self.register_buffer(f"{k}{i}", _T(v))
                self.bn.append(True)
            else:
                self.register_buffer(f"bias{i}", _T(p[name]["bias"]))
                self.bn.append(False)

    def _norm(self, h: torch.Tensor, i: int) -> torch.Tensor:
        bias = getattr(self, f"bias{i}")[None, :, None, None]
        if not self.bn[i]:
            return h + bias
        mean, var, scale = (getattr(self, f"{k}{i}")[None, :, None, None] for k in ("mean", "var", "scale"))
        return (h - mean) * torch.rsqrt(var + self.eps) * scale + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_first:
            x = F.relu(x)
        h = F.relu(self._norm(F.conv2d(x, self.w1, padding=1), 0))
        h = F.relu(self._norm(F.conv2d(h, self.w2, stride=self.stride, padding=1), 1))
        return F.conv2d(h, self.w3, self.b3)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """cfjax's 2x2 space-to-depth in NCHW: (B, C, H, W) -> (B, 4C, H/2, W/2), channels (dy, dx, c)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(y: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = y.shape
    c = c4 // 4
    return y.reshape(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c, 2 * h, 2 * w)


def haar_forward(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    return torch.cat([(a + b + c + d) * 0.5, (a - b + c - d) * 0.5, (a + b - c - d) * 0.5, (a - b - c + d) * 0.5], 1)


def haar_inverse(y: torch.Tensor) -> torch.Tensor:
    s, hd, vd, dd = torch.chunk(y, 4, dim=1)
    bsz, c, h, w = s.shape
    x = y.new_empty((bsz, c, 2 * h, 2 * w))
    x[:, :, 0::2, 0::2] = (s + hd + vd + dd) * 0.5
    x[:, :, 0::2, 1::2] = (s - hd + vd - dd) * 0.5
    x[:, :, 1::2, 0::2] = (s + hd - vd - dd) * 0.5
    x[:, :, 1::2, 1::2] = (s - hd - vd + dd) * 0.5
    return x


def _affine_tanh(x, a, clamp: float, rev: bool = False):
    c = x.shape[1]
    s = clamp * torch.tanh(0.2 * a[:, :c])
    if rev:
        return (x - a[:, c:]) * torch.exp(-s), -s.sum((1, 2, 3))
    return x * torch.exp(s) + a[:, c:], s.sum((1, 2, 3))


def _atan_affine(x, raw, clamp: float, rev: bool = False):
    d = x.shape[-1]
    s = clamp * (2.0 / math.pi) * torch.atan(raw[:, :d] / clamp)
    if rev:
        return (x - raw[:, d:]) * torch.exp(-s), -s.sum(-1)
    return x * torch.exp(s) + raw[:, d:], s.sum(-1)


class TwinIBINN(nn.Module):
    """The IB-INN flow in eval mode: ``forward`` u (B, C, H, W) -> (z (B, D) in cfjax's order,
    log|det dz/du| (B,)); ``inverse`` z (B, D) -> u (B, C, H, W)."""

    def __init__(self, params: dict, config):
        super().__init__()
        from cfjax.models import ibinn

        self.config = cfg = config
        net, bn = params["net"], params["bn"]
        take = lambda tree, i: {k: take(v, i) if isinstance(v, dict) else np.asarray(v)[i] for k, v in tree.items()}  # noqa: E731
        self.high = nn.ModuleList(_Subnet(take(net["high"], i), take(bn["high"], i), cfg.bn_eps, True) for i in range(cfg.blocks_high))
        self.low = nn.ModuleList(_Subnet(take(net["low"], i), take(bn["low"], i), cfg.bn_eps, True) for i in range(cfg.blocks_low))
        self.strided = _Subnet(net["down"]["strided"], bn["down"]["strided"], cfg.bn_eps, False, stride=2)
        self.lowres = _Subnet(net["down"]["lowres"], bn["down"]["lowres"], cfg.bn_eps, False)
        self.register_buffer("q_high", _T(ibinn.mixings(cfg, "high")))
        self.register_buffer("q_low", _T(ibinn.mixings(cfg, "low")))
        if cfg.dense:
            n = cfg.low_shape[0]
            self.register_buffer("dct", _T(ibinn.dct_matrix(n)))
            perm = np.asarray(ibinn.dense_permutation(cfg))
            self.register_buffer("perm", torch.tensor(perm, dtype=torch.long))
            self.register_buffer("perm_inv", torch.tensor(np.argsort(perm), dtype=torch.long))
            for k in ("fc1", "fc2"):
                for n_, v in net["dense"][k].items():
                    self.register_buffer(f"{k}_{n_}", _T(v))
        self.log_scale = math.log(cfg.block_scale)

    def _fc(self, name: str, x: torch.Tensor) -> torch.Tensor:
        g = lambda k: getattr(self, f"{name}_{k}")  # noqa: E731
        return F.relu(x @ g("w1") + g("b1")) @ g("w2") + g("b2")

    def _aio(self, sub: _Subnet, q: torch.Tensor, x: torch.Tensor):
        cfg = self.config
        c = x.shape[1]
        c1 = c - c // 2
        a = sub(x[:, :c1])
        s = cfg.clamp * torch.tanh(0.1 * a[:, : c - c1])
        y2 = x[:, c1:] * torch.exp(s) + a[:, c - c1:]
        y = cfg.block_scale * torch.einsum("bchw,dc->bdhw", torch.cat([x[:, :c1], y2], 1), q)
        return y, s.sum((1, 2, 3)) + x.shape[2] * x.shape[3] * c * self.log_scale

    def _aio_inv(self, sub: _Subnet, q: torch.Tensor, y: torch.Tensor):
        cfg = self.config
        c = y.shape[1]
        c1 = c - c // 2
        v = torch.einsum("bdhw,dc->bchw", y / cfg.block_scale, q)
        a = sub(v[:, :c1])
        s = cfg.clamp * torch.tanh(0.1 * a[:, : c - c1])
        return torch.cat([v[:, :c1], (v[:, c1:] - a[:, c - c1:]) * torch.exp(-s)], 1)

    def forward(self, u: torch.Tensor):
        cfg = self.config
        x = haar_forward(u)
        logdet = u.new_zeros(u.shape[0])
        for i, sub in enumerate(self.high):
            x, ld = self._aio(sub, self.q_high[i], x)
            logdet = logdet + ld
        c1 = x.shape[1] // 2
        x1, x2 = x[:, :c1], x[:, c1:]
        y2, ld2 = _affine_tanh(squeeze(x2), self.strided(x1), cfg.clamp)
        y1, ld1 = _affine_tanh(squeeze(x1), self.lowres(y2), cfg.clamp)
        x, logdet = torch.cat([y1, y2], 1), logdet + ld1 + ld2
        for i, sub in enumerate(self.low):
            x, ld = self._aio(sub, self.q_low[i], x)
            logdet = logdet + ld
        if not cfg.dense:
            return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1), logdet
        m = self.dct
        v = torch.einsum("ki,lj,bcij->bklc", m, m, x).reshape(x.shape[0], -1)[:, self.perm]
        d1 = v.shape[1] // 2
        v1, v2 = v[:, :d1], v[:, d1:]
        v1, l1 = _atan_affine(v1, self._fc("fc2", v2), cfg.dense_clamp)
        v2, l2 = _atan_affine(v2, self._fc("fc1", v1), cfg.dense_clamp)
        return torch.cat([v1, v2], 1), logdet + l1 + l2

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h, w, c = cfg.low_shape
        if cfg.dense:
            d1 = z.shape[1] // 2
            v1, v2 = z[:, :d1], z[:, d1:]
            v2, _ = _atan_affine(v2, self._fc("fc1", v1), cfg.dense_clamp, rev=True)
            v1, _ = _atan_affine(v1, self._fc("fc2", v2), cfg.dense_clamp, rev=True)
            v = torch.cat([v1, v2], 1)[:, self.perm_inv].reshape(z.shape[0], h, w, c)
            m = self.dct
            x = torch.einsum("ki,lj,bklc->bcij", m, m, v)
        else:
            x = z.reshape(z.shape[0], h, w, c).permute(0, 3, 1, 2)
        for i in reversed(range(len(self.low))):
            x = self._aio_inv(self.low[i], self.q_low[i], x)
        c1 = self.config.high_shape[-1] // 2
        y1, y2 = x[:, : 4 * c1], x[:, 4 * c1:]
        x1 = unsqueeze(_affine_tanh(y1, self.lowres(y2), cfg.clamp, rev=True)[0])
        x2 = unsqueeze(_affine_tanh(y2, self.strided(x1), cfg.clamp, rev=True)[0])
        x = torch.cat([x1, x2], 1)
        for i in reversed(range(len(self.high))):
            x = self._aio_inv(self.high[i], self.q_high[i], x)
        return haar_inverse(x)


class TwinIBINNClassifier(nn.Module):
    """cfjax's IB-INN flow classifier in torch (inference): ``encode`` x (B, C, H, W) in [0, 1] ->
    (z (B, D), log|det dz/dx| (B,)), ``decode`` z -> x (not clipped), the class Gaussians' ``mu``
    and the ``class_means`` ECINN moves between."""

    def __init__(self, params: dict, config):
        super().__init__()
        from cfjax.models.flow_classifier import is_ibinn

        if not is_ibinn(config):
            raise CfjaxError("TwinIBINNClassifier twins IB-INN flows (arch 'ibinn'); use TwinFlowClassifier for Glow flows")
        if config.preprocess != "affine":
            raise CfjaxError("the IB-INN twin covers the affine preprocessing (the shipped flow) only")
        self.config = config
        self.flow = TwinIBINN(params["glow"], config.glow)
        self.register_buffer("mu", _T(params["latent"]["mu"]))
        self.register_buffer("logit_prior", _T(params["latent"]["logit_prior"]))
        self.register_buffer("class_means", _T(params["class_means"]))
        self.dim = config.latent_dim

    def encode(self, x: torch.Tensor):
        z, logdet = self.flow(2.0 * x - 1.0)
        return z, logdet + self.dim * math.log(2.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.flow.inverse(z) + 1.0)

    def squared_distances(self, z: torch.Tensor) -> torch.Tensor:
        mu = self.mu
        return torch.clamp((z * z).sum(-1, keepdim=True) - 2.0 * z @ mu.T + (mu * mu).sum(-1)[None, :], min=0.0)

    def class_logits_z(self, z: torch.Tensor) -> torch.Tensor:
        logits = -0.5 * self.squared_distances(z)
        if self.config.latent.use_prior_at_test:
            logits = logits + torch.log_softmax(self.logit_prior, -1)[None, :]
        return logits
