"""Pictures: counterfactual grids (query | counterfactual | difference | heatmap)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_image(ax, img, cmap="gray", vmin=0.0, vmax=1.0):
    """Draw one (H, W), (H, W, 1) or (H, W, 3) image on ``ax`` without ticks."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    ax.imshow(np.clip(img, vmin, vmax) if img.ndim == 3 else img, cmap=None if img.ndim == 3 else cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


_mpl = pyplot  # the name examples/ use


def save_counterfactual_grid(
    path,
    x,
    x_cf,
    y_pred,
    y_target,
    y_cf_pred,
    heatmap=None,
    p_pred=None,
    p_cf=None,
    class_names=None,
    title: str | None = None,
    max_rows: int = 24,
    groups: int | None = None,
) -> Path:
    """Write a PNG grid, one example a row (in up to ``groups`` side-by-side column groups).

    x, x_cf: (N, H, W, C) in [0, 1]; heatmap: (N, H, W) or None; labels (N,) ints;
    p_pred / p_cf: (N,) probabilities shown under the query / counterfactual.
    """
    plt = pyplot()
    n = min(len(x), max_rows)
    if groups is None:
        groups = 1 if n <= 6 else (2 if n <= 16 else 3)
    rows = -(-n // groups)
    cols_per = 4 if heatmap is not None else 3
    name = (lambda c: str(class_names[c])) if class_names is not None else (lambda c: str(int(c)))
    fig, axes = plt.subplots(rows, cols_per * groups, figsize=(1.55 * cols_per * groups, 1.75 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    diff_lim = max(1e-6, float(np.abs(np.asarray(x_cf[:n]) - np.asarray(x[:n])).max()))
    for i in range(n):
        r, g = i % rows, i // rows
        a = axes[r, g * cols_per : (g + 1) * cols_per]
        for ax in a:
            ax.axis("on")
        pp = f" ({p_pred[i]:.2f})" if p_pred is not None else ""
        pc = f" ({p_cf[i]:.2f})" if p_cf is not None else ""
        show_image(a[0], x[i])
        a[0].set_xlabel(f"pred {name(y_pred[i])}{pp}", fontsize=7)
        show_image(a[1], x_cf[i])
        ok = int(y_cf_pred[i]) == int(y_target[i])
        a[1].set_xlabel(f"target {name(y_target[i])}: {name(y_cf_pred[i])}{pc}", fontsize=7, color="black" if ok else "red")
        d = np.asarray(x_cf[i], np.float32) - np.asarray(x[i], np.float32)
        d = d.mean(-1) if d.ndim == 3 else d
        show_image(a[2], d, cmap="RdBu_r", vmin=-diff_lim, vmax=diff_lim)
        a[2].set_xlabel("x_cf - x", fontsize=7)
        if heatmap is not None:
            h = np.asarray(heatmap[i], np.float32)
            show_image(a[3], h, cmap="inferno", vmin=0.0, vmax=max(float(h.max()), 1e-6))
            a[3].set_xlabel("heatmap", fontsize=7)
        if r == 0:
            for ax, t in zip(a, ["query", "counterfactual", "difference", "heatmap"]):
                ax.set_title(t, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path, dpi: int = 130) -> Path:
    """Save a Matplotlib figure atomically (temporary file + rename, mode from the umask) and close it."""
    from cfjax.checkpoint import output_mode

    plt = pyplot()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + (path.suffix or ".png"), dir=path.parent or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.chmod(tmp, output_mode())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
