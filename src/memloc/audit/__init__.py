"""`memloc audit`: a model memloc did not train, and the user's sequences or examples.

- `lm.py`: a language model folder: which sequences are memorized, where, an edited model out, verified
- `scan.py`: the streaming scan of a token file too large for memory
- `classifier.py`: a trained classifier (`--weights FILE.safetensors`) and its training examples
"""

from . import lm
from .classifier import run_classifier_audit
from .lm import run_audit

__all__ = ["run_audit", "run_classifier_audit"]


def __getattr__(name: str):
    """`memloc.audit.X` for the names the module had before it became this package (one release)."""
    return getattr(lm, name)
