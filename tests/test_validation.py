"""cfjax.validation: the one home of the checks on images, target classes and numbers."""

import numpy as np
import pytest

from cfjax import data
from cfjax.errors import CfjaxError
from cfjax.validation import (
    check_number,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    validate_images,
    validate_targets,
)


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((2, 28, 28, 3), np.float32), "channel"),
        (np.zeros((2, 32, 32, 1), np.float32), "expects"),
        (np.zeros((28, 28), np.float32), "shape"),
        (np.full((2, 28, 28, 1), np.nan, np.float32), "NaN"),
        (np.full((2, 28, 28, 1), np.inf, np.float32), "NaN or infinite"),
        (np.full((2, 28, 28, 1), 255.0, np.float32), r"\[0, 1\]"),
        (np.full((2, 28, 28, 1), -0.5, np.float32), r"\[0, 1\]"),
        (np.zeros((2, 28, 28, 1), np.uint8), "integer dtype"),
        (np.array([["a"]]), "numeric"),
        (np.zeros((0, 28, 28, 1), np.float32), "empty"),
    ],
)
def test_validate_images_rejects(x, match):
    with pytest.raises(CfjaxError, match=match):
        validate_images(x, (28, 28, 1))


def test_validate_images_accepts_hw_for_one_channel():
    assert validate_images(np.zeros((3, 28, 28)), (28, 28, 1)).shape == (3, 28, 28, 1)


def test_validate_targets():
    assert validate_targets([1, 2], 10, 2).tolist() == [1, 2]
    with pytest.raises(CfjaxError, match="outside"):
        validate_targets([1, 10], 10, 2)
    with pytest.raises(CfjaxError, match="outside"):
        validate_targets(-1, 10)
    with pytest.raises(CfjaxError, match="integer"):
        validate_targets([0.5], 10)


def test_data_keeps_the_public_names():
    assert data.validate_images is validate_images and data.validate_targets is validate_targets


@pytest.mark.parametrize(
    "check, value, rule",
    [
        (positive_int, 0, "a positive integer"),
        (positive_int, -3, "a positive integer"),
        (positive_int, 2.0, "a positive integer"),
        (positive_int, True, "a positive integer"),
        (non_negative_int, -1, "an integer >= 0"),
        (positive_float, 0.0, "a positive finite number"),
        (positive_float, float("nan"), "a positive finite number"),
        (non_negative_float, -0.5, "a finite number >= 0"),
        (non_negative_float, float("inf"), "a finite number >= 0"),
    ],
)
def test_number_checks_name_the_argument(check, value, rule):
    with pytest.raises(CfjaxError) as e:
        check(value, "batch_size")
    assert str(e.value) == f"batch_size must be {rule}, got {value!r}"


def test_number_checks_accept_and_convert():
    assert positive_int(np.int64(3), "n") == 3 and type(positive_int(np.int64(3), "n")) is int
    assert non_negative_int(0, "n") == 0
    assert positive_float(2, "lr") == 2.0 and non_negative_float(0, "w") == 0.0
    assert check_number(1.5, "x", integer=False, minimum=1) == 1.5
    with pytest.raises(CfjaxError, match="x must be a finite number > 1"):
        check_number(1, "x", integer=False, minimum=1, strict=True)
