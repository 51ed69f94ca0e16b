"""Checks on concrete values at the library's entry points: images, target classes, numbers.

Every check raises :class:`~cfjax.errors.CfjaxError` naming the argument it was given
(``batch_size must be a positive integer, got 0``), never a command-line flag: the CLI declares
its flags with the argparse types of :mod:`cfjax.cli.common`, which call the same rules, so a
bad flag is refused by argparse under its own name before any work. Functions that run under
``jax.jit`` cannot check traced values; they turn invalid classes into NaN instead.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from cfjax.errors import CfjaxError

__all__ = [
    "describe_number",
    "number_problem",
    "check_number",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "finite_float",
    "validate_images",
    "class_range_problem",
    "validate_targets",
]


# --------------------------------------------------------------------------------------------
# numbers


def describe_number(integer: bool, minimum: float | None = None, strict: bool = False) -> str:
    """The phrase a number rule is stated in: ``a positive integer``, ``a finite number >= 0``..."""
    noun = "an integer" if integer else "a finite number"
    if minimum is None:
        return noun
    if minimum == 0 and strict:
        return "a positive integer" if integer else "a positive finite number"
    return f"{noun} {'>' if strict else '>='} {minimum:g}"


def number_problem(value, integer: bool, minimum: float | None = None, strict: bool = False) -> str | None:
    """None when ``value`` satisfies the rule, else the rule it breaks (see :func:`describe_number`).

    Integers: Python/NumPy ints, not bools and not floats. Numbers: any finite real (NaN and
    +-inf are always refused).
    """
    rule = describe_number(integer, minimum, strict)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return rule
    if integer and not isinstance(value, numbers.Integral):
        return rule
    if not integer and not math.isfinite(float(value)):
        return rule
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        return rule
    return None


def check_number(value, name: str, integer: bool, minimum: float | None = None, strict: bool = False):
    """``value`` (as int or float) when it satisfies the rule; CfjaxError naming ``name`` otherwise."""
    rule = number_problem(value, integer, minimum, strict)
    if rule is not None:
        raise CfjaxError(f"{name} must be {rule}, got {value!r}", argument=name)
    return int(value) if integer else float(value)


def positive_int(value, name: str) -> int:
    return check_number(value, name, True, 0, strict=True)


def non_negative_int(value, name: str) -> int:
    return check_number(value, name, True, 0)


def positive_float(value, name: str) -> float:
    return check_number(value, name, False, 0, strict=True)


def non_negative_float(value, name: str) -> float:
    return check_number(value, name, False, 0)


def finite_float(value, name: str) -> float:
    return check_number(value, name, False)


# --------------------------------------------------------------------------------------------
# images and classes


def validate_images(
    x, image_shape: tuple[int, int, int] | None = None, what: str = "images"
) -> np.ndarray:
    """Check a batch of images and return it as float32 (N, H, W, C).

    Accepts (N, H, W, C), or (N, H, W) for one channel. Raises CfjaxError naming the problem:
    non-numeric dtype, wrong rank or shape for the model, NaN/inf, values outside [0, 1].
    """
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise CfjaxError(f"{what} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 3 and image_shape is not None and image_shape[-1] == 1 and arr.shape[1:] == image_shape[:2]:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise CfjaxError(f"{what} must have shape (N, H, W, C), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise CfjaxError(f"{what} is empty (shape {arr.shape})")
    if image_shape is not None and tuple(arr.shape[1:]) != tuple(image_shape):
        h, w, c = image_shape
        if arr.shape[1:3] == (h, w):
            raise CfjaxError(f"{what} have {arr.shape[3]} channel(s) but the model expects {c} (shape {arr.shape[1:]} vs {tuple(image_shape)})")
        raise CfjaxError(f"{what} have shape {tuple(arr.shape[1:])} per image but the model expects {tuple(image_shape)}")
    if np.issubdtype(arr.dtype, np.integer):
        raise CfjaxError(f"{what} must be float in [0, 1], got integer dtype {arr.dtype} (divide uint8 pixels by 255)")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise CfjaxError(f"{what} contain {bad} NaN or infinite value(s)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise CfjaxError(f"{what} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return arr


def class_range_problem(t: np.ndarray, num_classes: int) -> str | None:
    """None when every class index in ``t`` lies in [0, num_classes), else what is wrong."""
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        bad = int(t.max() if t.max() >= num_classes else t.min())
        return f"class {bad} is outside the model's classes 0..{num_classes - 1}"
    return None


def validate_targets(targets, num_classes: int, n: int | None = None) -> np.ndarray:
    """Check target classes: integers in [0, num_classes); returns int32 (N,)."""
    t = np.asarray(targets)
    if not np.issubdtype(t.dtype, np.integer):
        if np.issubdtype(t.dtype, np.floating) and np.all(np.isfinite(t)) and np.all(t == np.round(t)):
            t = t.astype(np.int64)
        else:
            raise CfjaxError(f"targets must be integer class indices, got dtype {t.dtype}")
    if n is not None:
        t = np.broadcast_to(t, (n,)) if t.ndim == 0 else t
        if t.shape != (n,):
            raise CfjaxError(f"targets must have shape ({n},) to match the images, got {t.shape}")
    problem = class_range_problem(t, num_classes)
    if problem:
        raise CfjaxError(f"target {problem}")
    return t.astype(np.int32)
