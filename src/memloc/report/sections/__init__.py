"""The report's sections, one module per probe (or per part of a run), and the registry of them by probe name.

- `registry.py`: which section draws each probe (`PROBE_SECTIONS`), the sections of a run (`run_sections`)
- `generic.py`: a probe's files as the page reads them; the section of a probe with no module of its own
- `training.py`: learning curves and gradient accounting
- `sweep.py`, `rewinding.py`, `retraining.py`: the layer sweeps
- `flipping.py`, `detection.py`, `depth.py`, `dropout.py`, `memorization.py`, `sinks.py`: one probe each
- `grid.py`: a study's dropout grid and its baselines; `audit.py`: an audit's first screen
"""
