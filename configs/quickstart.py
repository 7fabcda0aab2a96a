"""Offline quickstart: an ATAC pre-activation ResNet on scikit-learn's bundled digits.

Real data (1,797 8x8 grayscale digits, fixed stratified 1,437/360 train/test split), no download.

Command:
  atac-train --config configs/quickstart.py --workdir workdirs/quickstart

Expected result: final eval/accuracy >= 0.95 on the 360 held-out digits (measured 0.97-0.99),
in well under 5 minutes on 2 CPU cores. ReLU baseline: add --config.model.act=relu.
"""

from atac_train.defaults import base_config


def get_config():
  config = base_config()
  config.model.name = "cifar_resnet20"
  config.model.act = "atac"
  config.model.options.reduction = 2
  config.model.options.act_layers = 4

  config.dataset.name = "digits"
  config.dataset.source = "sklearn"
  config.dataset.augment = "digits"

  config.num_epochs = 15
  config.global_batch_size = 64
  config.optimizer.name = "sgd"
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "cosine"
  config.schedule.learning_rate = 0.1
  config.schedule.warmup_epochs = 1.0
  config.log_every_steps = 10
  config.eval_every_epochs = 1
  config.keep_checkpoints = 2
  return config
