import numpy as np
import pytest
import tensorflow_datasets as tfds

from cfjax.data import load_dataset, make_fakemnist
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


def _float_image_source(builder, split=None, *args, **kwargs):
    """A random-access source of float32 images holding 0-255 values (as some tfds sets store them)."""
    rng = np.random.default_rng(0)
    return [{"image": (255.0 * rng.random((28, 28, 1))).astype(np.float32), "label": i % 10} for i in range(10)]


def test_tfds_streaming_and_in_memory_readers_agree_on_float_images():
    from cfjax.data import open_split

    with tfds.testing.mock_data(as_data_source_fn=_float_image_source):
        ds = load_dataset("mnist", "train")
        reader = open_split("mnist", "train")
        x, y = reader.read(3, 7)
        parts = [reader.read(a, min(a + 3, len(reader))) for a in range(0, len(reader), 3)]
    raw = np.stack([it["image"] for it in _float_image_source(None)])
    assert ds.images.max() <= 1.0 and ds.images.max() > 0.5  # 0-255 floats rescaled once, not per chunk
    np.testing.assert_array_equal(ds.images, raw / np.float32(255.0))
    np.testing.assert_array_equal(x, ds.images[3:7])
    np.testing.assert_array_equal(y, ds.labels[3:7])
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), ds.images)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), ds.labels)


def test_pixel_scale_is_decided_once_per_split():
    from cfjax.data import pixel_scale

    u8 = [{"image": np.zeros((2, 2, 1), np.uint8)}]
    unit = [{"image": np.full((2, 2, 1), 0.5, np.float32)}]
    wide = unit + [{"image": np.full((2, 2, 1), 200.0, np.float32)}]
    assert pixel_scale(u8) == 255.0 and pixel_scale(unit) == 1.0 and pixel_scale(wide) == 255.0
