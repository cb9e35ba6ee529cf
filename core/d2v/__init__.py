"""d2v: data2vec (1.0 and 2.0) for speech, text and images, built from plugins."""

from d2v.errors import SpecError
from d2v.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["SpecError", "hookimpl", "from_pretrained", "__version__"]


def from_pretrained(path, **kwargs):
    """Load a Hugging Face ``Data2Vec*`` checkpoint directory (or a d2v run checkpoint)."""
    from d2v.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
