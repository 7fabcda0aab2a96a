"""MNIST, the AReLU paper's ConvMNIST (3 x (conv -> max-pool -> act), Linear(40, 10)) with AReLU.

SGD momentum 0.9 (no Nesterov), batch 128, 20 epochs, constant lr, no weight decay, un-normalised
MNIST (pixels in [0, 1]). The paper's headline is the small-learning-rate regime, so lr = 1e-4
here; sweep --config.schedule.learning_rate over 1e-2, 1e-3, 1e-4, 1e-5 and --config.seed over 5
seeds to reproduce its table.

Command (prepare once: `atac-prepare mnist --data-dir DIR`):
  atac-train --config configs/mnist_convnet_arelu.py --workdir workdirs/mnist_arelu \
      --config.dataset.data_dir=DIR

Expected result (paper, best test accuracy, mean of 5 seeds, lr 1e-4): AReLU 95.83% vs ReLU
87.00% (--config.model.act=relu).
"""

from atac_train.defaults import base_config


def get_config():
  config = base_config()
  config.model.name = "convnet_mnist"
  config.model.act = "arelu"

  config.dataset.name = "mnist"
  config.dataset.source = "tfds"
  config.dataset.augment = "none"
  config.dataset.mean = (0.0,)
  config.dataset.std = (1.0,)

  config.num_epochs = 20
  config.global_batch_size = 128
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 0.0
  config.schedule.name = "constant"
  config.schedule.learning_rate = 1e-4
  config.log_every_steps = 100
  return config
