"""The ``d2v_cli_commands`` hook: plugins add ``d2v`` subcommands, clashes name the plugin."""

from __future__ import annotations

import types

from d2v import hookimpl
from d2v.api import plugins
from d2v.cli.main import main
from d2v.api.errors import SpecError


def _plugin(name: str, fn):
    @hookimpl
    def d2v_cli_commands(subparsers):
        p = subparsers.add_parser(name, help="a test command")
        p.add_argument("--times", type=int, default=1)
        p.set_defaults(fn=fn)

    return types.SimpleNamespace(d2v_cli_commands=d2v_cli_commands)


def test_plugin_subcommand_runs_and_errors_are_clean(capsys):
    calls = []

    def greet(args):
        if args.times < 0:
            raise SpecError("--times must be >= 0")
        calls.append(args.times)
        return 0

    plugins.register_plugin(_plugin("greet", greet), "greeter")
    try:
        assert main(["greet", "--times", "3"]) == 0
        assert calls == [3]
        assert main(["greet", "--times", "-1"]) == 2
        assert "d2v: error: --times must be >= 0" in capsys.readouterr().err
    finally:
        plugins.unregister_plugin("greeter")


def test_plugin_subcommand_clash_names_the_plugin(capsys):
    plugins.register_plugin(_plugin("run", lambda args: 0), "clasher")
    try:
        assert main(["list"]) == 2
        err = capsys.readouterr().err
        assert "plugin 'clasher'" in err and "run" in err
    finally:
        plugins.unregister_plugin("clasher")
    assert main(["list", "processor"]) == 0
