"""Load a pickled PyTorch file without running code from it.

A pickle is a little program: it may name any importable callable (``os.system``) and call it.
fairseq checkpoints are pickles whose ``cfg`` holds omegaconf ``DictConfig`` objects (or an
``argparse.Namespace`` in old ones) and whose ``extra_state`` holds fairseq's meters, so
``torch.load(weights_only=True)`` refuses them and ``weights_only=False`` trusts them fully.

:func:`load_untrusted` sits in between. Its unpickler resolves a global to a real object only
when it is harmless: PyTorch's own ``weights_only`` allow-list (tensor rebuilders, dtypes,
``OrderedDict``) and a few plain builtin types. A global from a module a checkpoint legitimately
mentions (omegaconf, fairseq, numpy, argparse, typing, enum, ...) becomes an inert
:class:`Recorded` stand-in that only stores the arguments and state the pickle gives it, so
calling it runs nothing. Any other global (``os.system``, ``builtins.eval``, ``subprocess``) stops
the load with :class:`UnsafePickleError`. :func:`plain` then turns the stand-ins back into plain
data: an omegaconf config becomes nested dicts and lists, a ``Namespace`` a dict.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["Recorded", "UnsafePickleError", "load_untrusted", "plain"]

#: modules whose objects may appear in a checkpoint and are kept as inert records
RECORDED_MODULES = ("omegaconf", "fairseq", "examples", "numpy", "argparse", "typing", "enum", "pathlib",
                    "hydra", "dataclasses", "datetime", "fractions", "decimal", "bitarray")

#: builtin types that are safe to call with any arguments
SAFE_BUILTINS = {
    "builtins." + t.__name__: t
    for t in (bool, int, float, complex, str, bytes, bytearray, list, dict, tuple, set, frozenset, slice, object, range)
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a callable no checkpoint needs (it could run arbitrary code)."""


class Recorded:
    """An inert stand-in for an object of a class d2v does not import: it keeps what the pickle
    passes to it (constructor arguments, state, items) and does nothing else."""

    global_name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: list[Any] = []

    def __new__(cls, *args: Any, **kwargs: Any):  # NEWOBJ calls __new__ only
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<{self.global_name}>"


_RECORDED_CLASSES: dict[str, type[Recorded]] = {}


def _recorded_class(name: str) -> type[Recorded]:
    if name not in _RECORDED_CLASSES:
        _RECORDED_CLASSES[name] = type(name.rsplit(".", 1)[-1], (Recorded,), {"global_name": name})
    return _RECORDED_CLASSES[name]


def _torch_allowed() -> dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) spell builtins the Python 2 way
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        allowed = _torch_allowed().get(full)
        if allowed is not None:
            return allowed
        if full in SAFE_BUILTINS:
            return SAFE_BUILTINS[full]
        if full in ("collections.OrderedDict", "collections.defaultdict"):
            import collections

            return getattr(collections, name)
        if module.split(".")[0] in RECORDED_MODULES:
            return _recorded_class(full)
        raise UnsafePickleError(
            f"the file asks to call '{full}', which no checkpoint needs and which could run code on this "
            f"machine; d2v refuses to load it. If you trust the file, load it with torch.load yourself."
        )


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` class and ``load``."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def load_untrusted(path: str | Path) -> Any:
    """``torch.load`` of ``path`` on the CPU through the restricted unpickler."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)


# --------------------------------------------------------------------------- back to plain data


def _content(obj: Recorded) -> Any:
    state = obj.state if isinstance(obj.state, dict) else {}
    return state.get("_content", state.get("_val"))


def plain(obj: Any) -> Any:
    """Nested dicts/lists/scalars for loaded data: omegaconf ``DictConfig``/``ListConfig`` and
    their value nodes, ``argparse.Namespace`` and ``Enum`` members (their value, or name when
    only the name is known) are unwrapped; tensors are kept; other records stay as they are."""
    if isinstance(obj, Recorded):
        name = obj.global_name
        if name.startswith("omegaconf."):
            return plain(_content(obj))
        if name == "argparse.Namespace":
            return {k: plain(v) for k, v in (obj.state or {}).items()}
        if obj.args and len(obj.args) == 1 and not obj.state:  # an Enum member: Cls(value)
            return plain(obj.args[0])
        return obj
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj) if isinstance(obj, list) else tuple(plain(v) for v in obj)
    return obj
