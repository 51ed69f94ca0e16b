import numpy as np
import pytest
import tensorflow_datasets as tfds

from cfjax.data import load_dataset, make_fakemnist, validate_images, validate_targets
from cfjax.errors import CfjaxError


def test_mnist5k_split_is_stratified_disjoint_and_deterministic():
    tr, te = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert tr.images.shape == (4000, 28, 28, 1) and te.images.shape == (1000, 28, 28, 1)
    assert tr.images.dtype == np.float32 and 0.0 <= tr.images.min() and tr.images.max() <= 1.0
    assert np.bincount(tr.labels).tolist() == [400] * 10
    assert np.bincount(te.labels).tolist() == [100] * 10
    # No test image appears in train.
    tr_keys = {img.tobytes() for img in tr.images}
    assert not any(img.tobytes() in tr_keys for img in te.images)
    again = load_dataset("mnist5k", "test")
    np.testing.assert_array_equal(again.images, te.images)
    # --limit N sees several classes (shuffled order), not 100 zeros.
    assert len(set(te.labels[:20].tolist())) >= 5


def test_fakemnist_marker_pixel_matches_label():
    x = np.random.default_rng(0).uniform(0, 0.5, (50, 28, 28, 1)).astype(np.float32)
    xf, yf = make_fakemnist(x)
    assert np.all(xf[np.arange(50), yf, 0, 0] == 1.0)
    changed = np.argwhere(xf != x)
    assert np.all(changed[:, 2] == 0) and np.all(changed[:, 1] == yf[changed[:, 0]])
    ds = load_dataset("fakemnist5k", "test")
    assert np.all(ds.images[np.arange(len(ds)), ds.labels, 0, 0] == 1.0)


def test_tfds_path_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        ds = load_dataset("mnist", "train")
        assert ds.images.shape == (12, 28, 28, 1) and ds.images.dtype == np.float32
        assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
        assert ds.labels.dtype == np.int32 and ds.num_classes == 10
        cif = load_dataset("cifar10", "test")
        assert cif.images.shape == (12, 32, 32, 3)


def test_tfds_not_prepared_says_how(tmp_path):
    with pytest.raises(CfjaxError, match="not prepared.*tfds build mnist"):
        load_dataset("mnist", "train", tmp_path)


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", ""])
def test_unknown_dataset(name, tmp_path):
    with pytest.raises(CfjaxError, match="dataset"):
        load_dataset(name, "train", tmp_path)


def test_unknown_split():
    with pytest.raises(CfjaxError, match="unknown split"):
        load_dataset("mnist5k", "validation")


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
