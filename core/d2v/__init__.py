"""d2v: data2vec (1.0 and 2.0) for speech, text and images, built from plugins."""

from d2v.errors import BadFile, SpecError
from d2v.hookspecs import hookimpl
from d2v.pipeline import pipeline  # d2v.pipeline(task, model=...): predictions on your own files

__version__ = "0.1.0"
__all__ = ["BadFile", "SpecError", "hookimpl", "from_pretrained", "pipeline", "__version__"]


def from_pretrained(path, **kwargs):
    """Load a Hugging Face ``Data2Vec*`` checkpoint directory (or a d2v run checkpoint)."""
    from d2v.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
