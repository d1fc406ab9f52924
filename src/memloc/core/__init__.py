"""The core: what every task, probe and method stands on, and nothing task-specific.

- `errors.py`, `options.py`: the one error type with its exit codes; config fields that carry their CLI flags
- `runs.py`: the run directory (atomic writes, the lock, checkpoints, the study layout)
- `examples.py`, `tasks.py`: examples as tensors and their batches; the `Task` contract and its registry
- `layers.py`, `units.py`, `cutting.py`, `weights.py`: a model's layers and units, masking units, cutting a
  model in two, masking single weights
- `training.py`, `accounting.py`, `dropout.py`: the training loop with per-example records, gradient
  accounting, example-tied dropout (the layer training and inference pass example ids to)
- `inference.py`, `precision.py`, `budget.py`, `batching.py`: predictions, arithmetic per device, what a piece
  of work needs in memory and the batches that fit
- `distributed.py`, `scale.py`: data-parallel training, a probe's work split over processes or machines
- `figures.py`: drawing helpers the probes' and the report's figures share

Nothing here imports from `memloc.tasks`, the probes, the methods or anything above them
(tests/test_architecture.py holds it).
"""
