"""The input side: datasets behind one interface and grain pipelines for training and eval.

```python
from atac_train import data
info = data.get_info(config.dataset)
it = data.create_train_iterator(config.dataset, global_batch_size=128, seed=0,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
for batch in data.create_eval_iterable(config.dataset, global_batch_size=256, ...): ...
```

Batches hold uint8 pixels; the jitted step makes the model input with
``atac_train.data.device.DeviceTransform.from_info(info)`` (colour augmentation and normalisation
on the device; see docs/input.md).
"""

from atac_train.data.config import DatasetInfo, default_config
from atac_train.data.pipeline import create_eval_iterable, create_train_iterator, get_info

__all__ = ["DatasetInfo", "default_config", "get_info", "create_train_iterator",
           "create_eval_iterable"]
