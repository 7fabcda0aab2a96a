"""Sources behind one interface: digits, synthetic, tfds (mock_data), config checks, get_info."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from atac_train import data
from atac_train.data import config as config_lib
from atac_train.data import sources


def _config(**overrides):
  config = data.default_config()
  config.update(**overrides)
  return config


def test_default_config_is_the_offline_digits_quickstart():
  config = data.default_config()
  assert (config.name, config.source, config.train_split, config.eval_split) == (
      "digits", "sklearn", "train", "test")
  info = data.get_info(config)
  assert info == data.DatasetInfo(num_classes=10, image_shape=(8, 8, 1), num_train=1437,
                                  num_eval=360, max_value=16.0, augment="none",
                                  mean=(0.3053,), std=(0.3760,))


def test_digits_fixed_stratified_split():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  splits = sources.digits_splits()
  (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
  assert train_x.shape == (1437, 8, 8, 1) and test_x.shape == (360, 8, 8, 1)
  assert train_x.dtype == np.uint8 and train_x.max() == 16 and train_x.min() == 0
  assert np.bincount(test_y).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
  # The two splits partition sklearn's 1797 digits.
  digits = datasets.load_digits()
  ours = np.concatenate([train_x, test_x]).reshape(1797, 64)
  assert sorted(map(bytes, ours)) == sorted(map(bytes, digits.data.astype(np.uint8)))
  source = sources.open_source(_config(), "test")
  assert source.max_value == 16.0 and source[0]["label"] == int(test_y[0])


def test_digits_slices_and_bad_split():
  head = sources.open_source(_config(), "train[:10%]")
  assert len(head) == 144  # tfds rounding of 10% of 1437
  np.testing.assert_array_equal(head[5]["image"], sources.digits_splits()["train"][0][5])
  with pytest.raises(ValueError, match=r"accepted: \['test', 'train'\]"):
    sources.open_source(_config(), "validation")


def test_synthetic_any_shape_deterministic_and_learnable():
  config = _config(name="synthetic", source="synthetic", synthetic_shape=(5, 7, 2),
                   synthetic_num_classes=4, synthetic_num_examples=50,
                   synthetic_num_eval_examples=9)
  train = sources.open_source(config, "train")
  again = sources.open_source(config, "train")
  test = sources.open_source(config, "test")
  assert (len(train), len(test), train.num_classes, train.image_shape) == (50, 9, 4, (5, 7, 2))
  for i in (0, 13, 49):
    np.testing.assert_array_equal(train[i]["image"], again[i]["image"])
    assert train[i]["image"].shape == (5, 7, 2) and train[i]["image"].dtype == np.uint8
  assert not np.array_equal(train[0]["image"], test[0]["image"])
  labels = np.array([train[i]["label"] for i in range(50)])
  brightness = np.array([train[i]["image"].mean() for i in range(50)])
  assert set(labels) <= set(range(4))
  assert np.corrcoef(labels, brightness)[0, 1] > 0.9  # the label is visible in the image
  other_seed = sources.open_source(_config(**{**config.to_dict(), "synthetic_seed": 1}), "train")
  assert not np.array_equal(train[0]["image"], other_seed[0]["image"])
  with pytest.raises(ValueError, match="shape"):
    sources.open_source(_config(source="synthetic", synthetic_shape=(8, 8)), "train")


def test_get_info_shapes_follow_augment_and_image_size():
  synthetic = dict(name="synthetic", source="synthetic", synthetic_shape=(40, 50, 3))
  assert data.get_info(_config(**synthetic)).image_shape == (40, 50, 3)
  assert data.get_info(_config(**synthetic, augment="imagenet")).image_shape == (224, 224, 3)
  assert data.get_info(_config(**synthetic, augment="alexnet")).image_shape == (128, 128, 3)
  assert data.get_info(_config(**synthetic, image_size=64)).image_shape == (64, 64, 3)


@pytest.mark.parametrize("field,value,accepted", [
    ("source", "hf", "'sklearn', 'tfds', 'tarball', 'synthetic'"),
    ("augment", "autoaugment", "'none', 'cifar', 'imagenet', 'alexnet', 'digits'"),
    ("label_mode", "super", "'fine', 'coarse'"),
])
def test_bad_config_lists_accepted_values(field, value, accepted):
  with pytest.raises(ValueError, match=f"dataset.{field}={value!r}.*{accepted}"):
    data.get_info(_config(**{field: value}))


def test_sklearn_source_is_digits_only():
  with pytest.raises(ValueError, match="source='sklearn' provides the dataset 'digits' only"):
    data.get_info(_config(name="cifar10"))


def test_normalization_defaults_and_errors():
  mean, std = config_lib.normalization(_config(name="cifar10"), 3)
  np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465])
  np.testing.assert_allclose(std, [0.2023, 0.1994, 0.2010])
  mean, std = config_lib.normalization(_config(name="imagenet2012"), 3)
  np.testing.assert_allclose(mean, [0.485, 0.456, 0.406])
  mean, std = config_lib.normalization(_config(name="foo", mean=(0.1,), std=(2.0,)), 3)
  np.testing.assert_allclose(mean, [0.1] * 3)
  np.testing.assert_allclose(std, [2.0] * 3)
  with pytest.raises(ValueError, match="give 1 or 3 values"):
    config_lib.normalization(_config(mean=(0.1, 0.2)), 3)


def test_variable_size_images_need_a_size():
  with pytest.raises(ValueError, match="set dataset.image_size"):
    config_lib.output_shape(_config(name="imagenet2012"), (None, None, 3))


def test_tfds_under_mock_data():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    config = _config(name="cifar100", source="tfds", augment="cifar")
    info = data.get_info(config)
    assert info == data.DatasetInfo(num_classes=100, image_shape=(32, 32, 3), num_train=12,
                                    num_eval=12, augment="cifar", mean=config_lib.CIFAR_MEAN,
                                    std=config_lib.CIFAR_STD)
    coarse = sources.open_source(_config(**{**config.to_dict(), "label_mode": "coarse"}),
                                 "train")
    assert coarse.num_classes == 20 and 0 <= coarse[3]["label"] < 20
    fine = sources.open_source(config, "train")
    record = fine[3]
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
    batch = next(data.create_train_iterator(config, global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].max() < 100
    evals = list(data.create_eval_iterable(config, global_batch_size=5))
    assert [b["mask"].sum() for b in evals] == [5, 5, 2]

    mnist = _config(name="mnist", source="tfds")
    assert data.get_info(mnist).image_shape == (28, 28, 1)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  config = _config(name="cifar10", source="tfds", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=f"not prepared.*atac-prepare cifar10 --data-dir {tmp_path}"):
    data.get_info(config)


def test_unknown_tfds_dataset():
  """One line, not tfds' list of every dataset name."""
  with pytest.raises(ValueError, match="'no_such_dataset_xyz' is not a tfds dataset") as error:
    sources.open_source(_config(name="no_such_dataset_xyz", source="tfds"), "train")
  assert "\n" not in str(error.value)
