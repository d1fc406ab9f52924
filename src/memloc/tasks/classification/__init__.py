"""Classification with label noise: images, 1-D signals and features, the paper's task.

- `data.py`: DataConfig -> Dataset (the splits as tensors, label noise, rare marks, normalization)
- `readers.py`: datasets from their standard on-disk formats (offline, without unpickling)
- `models.py`: the models memloc builds by name, and the default for a data shape
- `wrap.py`: the user's own arrays or torch dataset as a Dataset
- `task.py`: what the probes see of it (`ClassificationTask`)
"""

from ...core.tasks import register
from .data import Dataset
from .task import ClassificationTask

register(Dataset, ClassificationTask)

__all__ = ["ClassificationTask", "Dataset"]
