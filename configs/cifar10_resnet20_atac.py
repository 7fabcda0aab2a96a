"""CIFAR-10, ATAC pre-activation ResNet-20 (r = 2, every activation), the reference recipe.

SGD Nesterov 0.9, batch 128, lr 0.2 x0.1 at epochs 300 and 350, 400 epochs, weight decay 1e-4 on
all parameters (BN included), pad-4 crop + flip, CIFAR mean/std.

Command (tfds prepared with `atac-prepare cifar10 --data-dir DIR`):
  atac-train --config configs/cifar10_resnet20_atac.py --workdir workdirs/c10_r20_atac \
      --config.dataset.data_dir=DIR
or straight from the official tarball (no TensorFlow):
  atac-train --config configs/cifar10_resnet20_atac.py --workdir workdirs/c10_r20_atac \
      --config.dataset.source=tarball --config.dataset.path=cifar-10-python.tar.gz
ReLU baseline: --config.model.act=relu.

Expected result (reference, not yet reproduced here): ATAC above ReLU at depth 20 (the paper's
CIFAR plot: 0.812 vs 0.799 on its 20-class "CIFAR-100"; CIFAR-10 ResNet-20 ReLU is ~0.92).
"""

from atac_train.defaults import base_config


def get_config():
  config = base_config()
  config.model.name = "cifar_resnet20"
  config.model.act = "atac"
  config.model.options.reduction = 2
  config.model.options.act_layers = 4

  config.dataset.name = "cifar10"
  config.dataset.source = "tfds"
  config.dataset.augment = "cifar"
  config.dataset.num_workers = 2

  config.num_epochs = 400
  config.global_batch_size = 128
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.optimizer.weight_decay_mask = "all"
  config.schedule.name = "step"
  config.schedule.learning_rate = 0.2
  config.schedule.decay_epochs = (300, 350)
  config.schedule.decay_factor = 0.1
  config.log_every_steps = 100
  config.eval_every_epochs = 5
  config.keep_every_epochs = 50
  return config
