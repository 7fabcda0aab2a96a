"""CIFAR-10 at 128x128, AlexNet-ATAC (conv biases, r = 2), the Paddle reproduction's recipe.

Adam lr 1e-3 with cosine decay over all steps, weight decay 1e-5 (L2, as Paddle), batch 128,
50 epochs, label smoothing 0.1, mixup (alpha 0.2: the reproduction does not state it,
[reconstructed]), train aug resize 130 + colour jitter 0.2 + random-resized-crop 128 (scale 0.6-1)
+ flip + rotation +-20 deg, ImageNet mean/std; test resize 128.

Command:
  atac-train --config configs/cifar10_alexnet_atac.py --workdir workdirs/c10_alexnet_atac \
      --config.dataset.data_dir=DIR   # or --config.dataset.source=tarball --config.dataset.path=F

Expected result (reference): val accuracy 0.8861 (ATAC) vs 0.7965 (ReLU, --config.model.act=relu).
"""

from atac_train.data.config import IMAGENET_MEAN, IMAGENET_STD
from atac_train.defaults import base_config


def get_config():
  config = base_config()
  config.model.name = "alexnet_cifar"
  config.model.act = "atac"
  config.model.options.reduction = 2

  config.dataset.name = "cifar10"
  config.dataset.source = "tfds"
  config.dataset.augment = "alexnet"
  config.dataset.image_size = 128
  config.dataset.mean = IMAGENET_MEAN
  config.dataset.std = IMAGENET_STD
  config.dataset.num_workers = 4

  config.num_epochs = 50
  config.global_batch_size = 128
  config.optimizer.name = "adam"
  config.optimizer.weight_decay = 1e-5
  config.optimizer.weight_decay_mask = "all"
  config.schedule.name = "cosine"
  config.schedule.learning_rate = 1e-3
  config.label_smoothing = 0.1
  config.mixup_alpha = 0.2
  config.log_every_steps = 100
  return config
