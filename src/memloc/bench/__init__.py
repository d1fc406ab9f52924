"""Localization benchmarks with a known answer (`memloc bench-localize`): TinyMem, INJ and DEL.

- `benchmarks.py`: the config, the models, the three benchmarks and their tables
- `page.py`: the benchmark's HTML page
"""

from .benchmarks import BenchConfig, bench_localize

__all__ = ["BenchConfig", "bench_localize"]
