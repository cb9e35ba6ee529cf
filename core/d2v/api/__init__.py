"""The plugin API: the component interfaces (``interfaces``), the registry and plugin loading
(``registry``, ``plugins``, ``hookspecs``, ``builtins``, ``manifest``) and the user-facing errors.

Imports nothing else from d2v; everything else (and every plugin) may import it.
"""
