"""Loading plugins: pluggy manager, entry points, and the live registry built from them.

* Every installed distribution with a ``[project.entry-points.d2v]`` entry is loaded; d2v's
  own audio/text/vision modalities and heads arrive exactly this way.
* ``D2V_LOAD_PLUGINS=a,b`` loads only the entry points named ``a`` and ``b`` (hermetic tests).
* ``D2V_TRACE_PLUGINS=1`` prints every hook call and which plugin answered to stderr.
* Core's own components (masking, optimizers, schedules, ...) are registered by
  :mod:`d2v.builtins` through the same hook, under the plugin name ``d2v``.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from d2v import hookspecs
from d2v.errors import SpecError
from d2v.registry import Registry

GROUP = "d2v"
_manager: pluggy.PluginManager | None = None
# plugin name -> name of the distribution that installed it ("d2v" for d2v's own plugins)
distributions: dict[str, str] = {"d2v": "d2v"}
_registry: Registry | None = None


def _trace(message: str) -> None:
    if os.environ.get("D2V_TRACE_PLUGINS"):
        print(f"d2v-trace: {message}", file=sys.stderr)


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (loads plugins on first use)."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        if os.environ.get("D2V_TRACE_PLUGINS"):
            pm.trace.root.setwriter(lambda msg: print(f"d2v-trace: {msg}", end="", file=sys.stderr))
            pm.enable_tracing()
        from d2v import builtins

        pm.register(builtins, name="d2v")
        _load_entry_points(pm)
        pm.check_pending()
        _manager = pm
    return _manager


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    wanted = os.environ.get("D2V_LOAD_PLUGINS")
    only = {n.strip() for n in wanted.split(",") if n.strip()} if wanted is not None else None
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if only is not None:
        missing = sorted(only - set(found))
        if missing:
            raise SpecError(
                f"D2V_LOAD_PLUGINS names {', '.join(missing)}, but no installed package has such a "
                f"'d2v' entry point. Installed: {', '.join(sorted(found)) or 'none'}."
            )
    for name, ep in sorted(found.items()):
        if only is not None and name not in only:
            continue
        if pm.get_plugin(name) is not None:
            continue
        _trace(f"loading entry point {name} = {ep.value}")
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one it is
            raise SpecError(f"plugin '{name}' ({ep.value}) failed to import: {exc!r}") from exc
        pm.register(module, name=name)
        dist = getattr(ep, "dist", None)
        distributions[name] = dist.name if dist is not None else "?"


def registry() -> Registry:
    """The live registry: every component of every loaded plugin."""
    global _registry
    if _registry is None:
        pm = plugin_manager()
        reg = Registry()
        for plugin_name, plugin in pm.list_name_plugin():
            _register_from(reg, plugin_name, plugin)
        _registry = reg
    return _registry


def _register_from(reg: Registry, name: str, plugin: Any) -> None:
    impl = getattr(plugin, "d2v_register", None)
    if impl is None:
        return
    _trace(f"d2v_register -> plugin '{name}'")
    impl(register=reg.registrar(name))


def register_plugin(plugin: ModuleType | Any, name: str) -> None:
    """Register a plugin object at run time (tests, notebooks). Undo with :func:`unregister_plugin`."""
    pm = plugin_manager()
    reg = registry()
    pm.register(plugin, name=name)
    pm.check_pending()
    try:
        _register_from(reg, name, plugin)
    except Exception:
        reg.remove_plugin(name)
        pm.unregister(name=name)
        raise


def unregister_plugin(name: str) -> None:
    pm = plugin_manager()
    registry().remove_plugin(name)
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)


def reset() -> None:
    """Forget loaded plugins (tests that change ``D2V_LOAD_PLUGINS``)."""
    global _manager, _registry
    _manager = None
    _registry = None
