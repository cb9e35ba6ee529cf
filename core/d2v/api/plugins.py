"""Loading plugins: pluggy manager, entry points, and the live registry built from them.

* Every installed distribution with a ``[project.entry-points.d2v]`` entry is loaded; d2v's
  own audio/text/vision modalities and heads arrive exactly this way.
* ``D2V_LOAD_PLUGINS=a,b`` loads only the entry points named ``a`` and ``b`` (hermetic tests).
* ``D2V_TRACE_PLUGINS=1`` prints every hook call and which plugin answered to stderr.
* A plugin that fails to import is reported once on stderr (with how to uninstall it) and left
  out; the others load. A spec naming a component the registry lacks then names that plugin.
* Core's own components (masking, optimizers, schedules, ...) are registered by
  :mod:`d2v.api.builtins` through the same hook, under the plugin name ``d2v``.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from d2v.api import hookspecs
from d2v.api.errors import SpecError
from d2v.api.registry import Registry, did_you_mean

GROUP = "d2v"
_manager: pluggy.PluginManager | None = None
# plugin name -> name of the distribution that installed it ("d2v" for d2v's own plugins)
distributions: dict[str, str] = {"d2v": "d2v"}
# plugin name -> why it is missing: its import error and how to fix it (one line)
broken: dict[str, str] = {}
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
        from d2v.api import builtins

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
        dist = getattr(ep, "dist", None)
        distributions[name] = dist.name if dist is not None else ep.value.partition(":")[0].partition(".")[0]
        try:
            module = ep.load()
        except Exception as exc:  # one broken plugin must not stop every d2v command
            _report_broken(name, ep.value, exc)
            continue
        pm.register(module, name=name)


def _report_broken(name: str, target: str, exc: Exception) -> None:
    """Remember why plugin ``name`` is missing and say so once on stderr."""
    lines = str(exc).strip().splitlines()
    error = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
    distribution = distributions[name]
    fix = "reinstall d2v" if distribution == "d2v" else \
        f"fix its installation or uninstall it: pip uninstall {distribution}"
    broken[name] = f"plugin '{name}' ({target}) failed to import: {error}; {fix}"
    print(f"d2v: warning: {broken[name]}. Going on without it.", file=sys.stderr)


class PluginRegistry(Registry):
    """The live registry: a name it lacks while a plugin failed to import blames that plugin
    (the likely provider) instead of calling the name unknown."""

    def get(self, kind: str, name: str, *, where: str = ""):
        if not broken or not isinstance(name, str) or name in self.names(kind):
            return super().get(kind, name, where=where)
        available = self.names(kind)
        at = f"{where}: " if where else ""
        raise SpecError(f"{at}{kind} '{name}' is not registered{did_you_mean(name, available) or '.'} It may come "
                        f"from a broken plugin: {'; '.join(broken.values())}. "
                        f"Available {kind} components: {', '.join(available) or 'none'}.")


def registry() -> Registry:
    """The live registry: every component of every loaded plugin."""
    global _registry
    if _registry is None:
        pm = plugin_manager()
        reg = PluginRegistry()
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
    broken.clear()
