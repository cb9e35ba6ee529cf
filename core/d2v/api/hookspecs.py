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

    * ``kind``: one of :data:`d2v.api.registry.KINDS` (``"encoder"``, ``"head"``, ...);
    * ``name``: the name specs use (``name: ctc``); unique within its kind across all
      plugins, or loading fails naming both plugins;
    * ``factory``: a callable, or a ``"module:attr"`` string imported only when the
      component is built or inspected -- so listing components stays cheap;
    * ``summary``: one line for ``d2v list`` and ``registry.yaml``.

    Called once per plugin when plugins load. Returns nothing.
    """


@hookspec
def d2v_cli_commands(subparsers):
    """Add subcommands to the ``d2v`` command line (as pytest's ``pytest_addoption``).

    ``subparsers`` is the ``argparse`` sub-parsers object of ``d2v``: call
    ``subparsers.add_parser(name, help=...)``, add arguments, and ``set_defaults(fn=...)``
    with ``fn(args) -> int`` (the exit status). ``fn`` raising ``d2v.api.errors.SpecError`` prints
    one clear message and exits with 2, like d2v's own commands. A name that is already taken
    fails with both the command and the plugin named. Keep the hook cheap (import heavy
    modules inside ``fn``): it runs every time ``d2v`` parses its command line. Returns nothing.
    """
