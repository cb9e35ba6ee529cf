"""The hooks a d2v plugin may implement (pluggy project name ``d2v``).

Every hook name starts with ``d2v_``. ``docs/writing-a-plugin.md`` documents each one with
its exact signature, and a test keeps the two in step.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("d2v")
hookimpl = pluggy.HookimplMarker("d2v")


@hookspec
def d2v_register(register):
    """Register this plugin's components.

    ``register(kind, name, factory, *, summary="")`` is a registrar owned by the host:

    * ``kind``: one of :data:`d2v.registry.KINDS` (``"encoder"``, ``"head"``, ...);
    * ``name``: the name specs use (``name: ctc``); unique within its kind across all
      plugins, or loading fails naming both plugins;
    * ``factory``: a callable, or a ``"module:attr"`` string imported only when the
      component is built or inspected -- so listing components stays cheap;
    * ``summary``: one line for ``d2v list`` and ``registry.yaml``.

    Called once per plugin when plugins load. Returns nothing.
    """
