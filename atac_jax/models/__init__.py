"""Host networks for ATAC, AReLU and AW-convolution, and their registry.

``create(name, *, num_classes, act='relu', **options)`` builds any of :func:`available_models`;
the classes are exported for other depths and direct use.
"""

from atac_jax.models.alexnet import AlexNet
from atac_jax.models.cifar_resnet import BasicBlockV2, CIFARResNetV2
from atac_jax.models.convnet import ConvMNIST
from atac_jax.models.registry import (available_models, count_macs, count_params, create,
                                      init_shapes, learned_scalars, model_options)
from atac_jax.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "AlexNet", "BasicBlock", "BasicBlockV2", "Bottleneck", "CIFARResNetV2", "ConvMNIST", "ResNet",
    "available_models", "count_macs", "count_params", "create", "init_shapes", "learned_scalars",
    "model_options",
]
