"""ImageNet, ATAC-ResNet-50 v1b (ATAC on relu1/relu2 of layer3 + layer4, r = 2), reference recipe.

SGD Nesterov 0.9, batch 256, peak lr 0.075 with 5-epoch linear warmup then cosine to 0, 160
epochs, weight decay 1e-4 without BN gamma/beta and biases, label smoothing 0.1, zero-gamma last BN,
bf16 compute, random-resized-crop 224 + flip + colour jitter 0.4 + PCA lighting 0.1; eval resize
256 + centre crop 224.

Command (prepare once: `atac-prepare imagenet2012 --data-dir DIR`, see README):
  atac-train --config configs/imagenet_resnet50_atac.py --workdir workdirs/in1k_r50_atac \
      --config.dataset.data_dir=DIR

Expected result (paper): top-1 error 21.41 / top-5 6.02 (28.0M params, 4.4 GMACs); ReLU
ResNet-50 v1b with a same-family recipe: 22.33.
"""

from atac_train.defaults import base_config


def get_config():
  config = base_config()
  config.model.name = "resnet50"
  config.model.act = "atac"
  config.model.options.reduction = 2
  config.model.options.act_layers = 2
  config.model.options.zero_init_last_bn = True

  config.dataset.name = "imagenet2012"
  config.dataset.source = "tfds"
  config.dataset.augment = "imagenet"
  config.dataset.eval_split = "validation"
  config.dataset.num_workers = 16

  config.num_epochs = 160
  config.global_batch_size = 256
  config.half_precision = True
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.optimizer.weight_decay_mask = "no_bn_bias"
  config.schedule.name = "cosine"
  config.schedule.learning_rate = 0.075
  config.schedule.warmup_epochs = 5.0
  config.label_smoothing = 0.1
  config.log_every_steps = 200
  config.eval_every_epochs = 4
  config.checkpoint_every_steps = 2000
  config.keep_every_epochs = 40
  return config
