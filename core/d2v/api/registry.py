"""The component registry: what every plugin registered, by kind and name, with provenance.

The host owns it; plugins only see the ``register`` callable handed to their
``d2v_register`` hook. Factories may be ``"module:attr"`` strings so nothing heavy is
imported until a component is actually built or inspected.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from d2v.api.errors import SpecError

KINDS = (
    "feature_extractor",
    "encoder",
    "head",
    "target",
    "objective",
    "masking",
    "dataset",
    "processor",
    "model",
    "optimizer",
    "schedule",
    "hf_converter",
    "fairseq_converter",
)


@dataclass
class Component:
    kind: str
    name: str
    factory: Callable[..., Any] | str
    plugin: str
    summary: str = ""
    #: the inputs it works on ("audio", "text", "image", ...); empty: any. ``d2v check`` refuses a
    #: spec whose feature extractor, encoder, processor, datasets and head share no modality.
    modalities: tuple[str, ...] = ()
    #: parameters that name files or folders; ``d2v check`` demands they exist (``--no-data``: not)
    paths: tuple[str, ...] = ()
    _resolved: Callable[..., Any] | None = field(default=None, repr=False)

    def resolve(self) -> Callable[..., Any]:
        """Import (once) and return the factory."""
        if self._resolved is None:
            if callable(self.factory):
                self._resolved = self.factory
            else:
                module_name, _, attr = self.factory.partition(":")
                if not attr:
                    raise SpecError(
                        f"{self.kind} '{self.name}' from plugin '{self.plugin}' has factory "
                        f"'{self.factory}', which is not of the form 'module:attr'."
                    )
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
                self._resolved = obj
        return self._resolved

    def signature(self) -> inspect.Signature:
        factory = self.resolve()
        target = factory.__init__ if inspect.isclass(factory) else factory
        sig = inspect.signature(target)
        params = [p for n, p in sig.parameters.items() if not (inspect.isclass(factory) and n == "self")]
        return sig.replace(parameters=params)

    def parameters(self) -> dict[str, Any]:
        """Parameter name -> default (``inspect.Parameter.empty`` when required)."""
        return {
            name: p.default
            for name, p in self.signature().parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def accepts_any_keyword(self) -> bool:
        return any(p.kind == p.VAR_KEYWORD for p in self.signature().parameters.values())

    def build(self, **params: Any) -> Any:
        return self.resolve()(**params)


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Registry:
    def __init__(self) -> None:
        self._components: dict[tuple[str, str], Component] = {}

    def registrar(self, plugin: str) -> Callable[..., None]:
        """The ``register`` callable handed to one plugin (it remembers who registered)."""

        def register(kind: str, name: str, factory: Callable[..., Any] | str, *, summary: str = "",
                     modalities: tuple[str, ...] | list[str] = (), paths: tuple[str, ...] | list[str] = ()) -> None:
            for label, values in (("modalities", modalities), ("paths", paths)):
                if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                    raise SpecError(f"plugin '{plugin}' registered {kind} '{name}' with {label}={values!r}; "
                                    f"expected a tuple of names, e.g. {label}=('{'audio' if label == 'modalities' else 'root'}',).")
            self.add(Component(kind=kind, name=name, factory=factory, plugin=plugin, summary=summary,
                               modalities=tuple(modalities), paths=tuple(paths)))

        return register

    def add(self, component: Component) -> None:
        if component.kind not in KINDS:
            raise SpecError(
                f"plugin '{component.plugin}' registered {component.name!r} under unknown kind "
                f"'{component.kind}'{did_you_mean(component.kind, KINDS)} Known kinds: {', '.join(KINDS)}."
            )
        key = (component.kind, component.name)
        if key in self._components:
            first = self._components[key]
            raise SpecError(
                f"{component.kind} '{component.name}' is registered twice: by plugin "
                f"'{first.plugin}' and by plugin '{component.plugin}'. Uninstall one of them "
                f"or rename the component in one plugin."
            )
        self._components[key] = component

    def remove_plugin(self, plugin: str) -> None:
        for key in [k for k, c in self._components.items() if c.plugin == plugin]:
            del self._components[key]

    def names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self._components if k == kind)

    def get(self, kind: str, name: str, *, where: str = "") -> Component:
        at = f"{where}: " if where else ""
        if not isinstance(name, str):
            raise SpecError(f"{at}a {kind} is named by a string, got {type(name).__name__} {name!r}. "
                            f"Available {kind} components: {', '.join(self.names(kind)) or 'none'}.")
        try:
            return self._components[(kind, name)]
        except KeyError:
            available = self.names(kind)
            listing = ", ".join(available) if available else "none (is the plugin that provides it installed?)"
            raise SpecError(
                f"{at}unknown {kind} '{name}'{did_you_mean(name, available)} "
                f"Available {kind} components: {listing}."
            ) from None

    def components(self, kind: str | None = None) -> list[Component]:
        return sorted(
            (c for c in self._components.values() if kind is None or c.kind == kind),
            key=lambda c: (KINDS.index(c.kind), c.name),
        )
