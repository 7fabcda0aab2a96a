"""The full training-config schema with defaults; every recipe in ``configs/`` starts from it.

Configs are locked after ``get_config()`` builds them, so a misspelt ``--config.key=value``
override fails and lists the valid keys.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the default config; recipes override fields and the CLI locks the result."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds parameter init, data order, augmentation, dropout and mixup

  # Model: atac_jax.models.create(name, num_classes=<from data>, act=act, **options).
  config.model = ml_collections.ConfigDict()
  config.model.name = "cifar_resnet20"  # one of atac_jax.models.available_models()
  config.model.act = "atac"  # one of atac_jax.layers.available_activations()
  config.model.options = ml_collections.ConfigDict()  # model options (reduction, act_layers, ...)

  # Data: see atac_train.data.default_config() for every field.
  from atac_train import data  # pylint: disable=g-import-not-at-top
  config.dataset = data.default_config()

  config.num_epochs = 10  # training length in epochs (steps_per_epoch = num_train // batch)
  config.global_batch_size = 128  # summed over all devices and processes
  config.eval_batch_size = 0  # 0: same as global_batch_size
  config.half_precision = False  # bfloat16 compute, float32 params and optimizer state

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # 'sgd' (momentum/Nesterov), 'adam' or 'adamw'
  config.optimizer.momentum = 0.9  # sgd momentum (0 for plain SGD)
  config.optimizer.nesterov = True  # sgd Nesterov momentum
  config.optimizer.b1 = 0.9  # adam/adamw
  config.optimizer.b2 = 0.999  # adam/adamw
  config.optimizer.weight_decay = 1e-4  # L2 added to the gradient (adamw: decoupled decay)
  config.optimizer.weight_decay_mask = "all"  # 'all' or 'no_bn_bias' (skip BN scale/bias, biases)
  config.optimizer.grad_clip_norm = 0.0  # 0: no clipping

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = "cosine"  # 'constant', 'step' or 'cosine' (to 0 at the last step)
  config.schedule.learning_rate = 0.1  # peak learning rate
  config.schedule.warmup_epochs = 0.0  # linear warmup from 0
  config.schedule.decay_epochs = (30, 60)  # 'step': epochs at which the lr is multiplied...
  config.schedule.decay_factor = 0.1  # ...by this factor

  config.label_smoothing = 0.0
  config.mixup_alpha = 0.0  # 0: no mixup; else lambda ~ Beta(alpha, alpha) per batch

  config.log_every_steps = 50  # train metrics to metrics.jsonl / TensorBoard
  config.eval_every_epochs = 1  # full-split eval interval (and always at the end)
  config.checkpoint_every_steps = 0  # 0: once per epoch; always at the end
  config.keep_checkpoints = 3  # latest N checkpoints kept...
  config.keep_every_epochs = 0  # ...plus one every K epochs (0: none)
  config.progress_bar = True  # tqdm bar on process 0
  # Fine-tuning: a workdir or checkpoint step folder whose parameters initialise this run
  # (leaves whose shape differs, e.g. a head with another num_classes, stay freshly initialised).
  config.init_from = ""
  return config
