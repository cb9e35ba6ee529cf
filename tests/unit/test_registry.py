"""Plugin loading and the registry: provenance, duplicates, did-you-mean, laziness."""

import re
import sys
import types
from pathlib import Path

import pytest

from d2v import hookimpl
from d2v.api import hookspecs
from d2v.api import plugins
from d2v.api.errors import SpecError
from d2v.api.registry import Component, Registry

ROOT = Path(__file__).resolve().parents[2]


def _plugin(**components):
    module = types.ModuleType("fake_plugin")

    @hookimpl
    def d2v_register(register):
        for name, (kind, factory) in components.items():
            register(kind, name, factory, summary=f"fake {name}")

    module.d2v_register = d2v_register
    return module


def test_builtin_plugins_arrive_through_entry_points():
    registry = plugins.registry()
    assert registry.get("masking", "span").plugin == "d2v"
    assert registry.get("encoder", "audio.transformer").plugin == "audio"
    assert registry.get("head", "ctc").plugin == "head-ctc"
    assert plugins.distributions["head-ctc"] == "d2v"


def test_duplicate_name_names_both_plugins():
    plugins.register_plugin(_plugin(first=("head", "x:y")), "plugin-one")
    try:
        with pytest.raises(SpecError, match=r"registered twice: by plugin 'plugin-one' and by plugin 'plugin-two'"):
            plugins.register_plugin(_plugin(first=("head", "x:z")), "plugin-two")
        assert plugins.plugin_manager().get_plugin("plugin-two") is None
    finally:
        plugins.unregister_plugin("plugin-one")


def test_unknown_name_lists_available_and_suggests():
    with pytest.raises(SpecError) as err:
        plugins.registry().get("masking", "spam", where="model.objective.masking")
    message = str(err.value)
    assert message.startswith("model.objective.masking: unknown masking 'spam'; did you mean 'span'?")
    assert "Available masking components: bert, block2d, inverse_block, random, span." in message


def test_unknown_kind_is_rejected():
    reg = Registry()
    with pytest.raises(SpecError, match="did you mean 'encoder'"):
        reg.registrar("p")("encodr", "x", "a:b")


def test_string_factories_are_imported_only_when_used():
    comp = Component(kind="head", name="lazy", factory="d2v_never_imported_module:Thing", plugin="p")
    assert "d2v_never_imported_module" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        comp.resolve()


def test_listing_imports_no_model_code():
    """`d2v list` stays cheap: string factories are not resolved."""
    import subprocess

    code = ("import sys; from d2v.api import plugins; plugins.registry();"
            "print(sorted(m for m in sys.modules if m.startswith(('d2v_audio.', 'd2v_targets.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_plugins_env_selects_entry_points(monkeypatch):
    monkeypatch.setenv("D2V_LOAD_PLUGINS", "head-ctc")
    plugins.reset()
    try:
        registry = plugins.registry()
        assert registry.names("head") == ["ctc"]
        assert registry.names("encoder") == []
        assert registry.names("masking")  # core's own components are always there
        monkeypatch.setenv("D2V_LOAD_PLUGINS", "head-ctc,nope")
        plugins.reset()
        with pytest.raises(SpecError, match="D2V_LOAD_PLUGINS names nope"):
            plugins.registry()
    finally:
        monkeypatch.delenv("D2V_LOAD_PLUGINS")
        plugins.reset()


def test_trace_env_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("D2V_TRACE_PLUGINS", "1")
    plugins.reset()
    try:
        plugins.registry()
        err = capsys.readouterr().err
        assert "d2v_register -> plugin 'audio'" in err
        assert "loading entry point head-ctc = d2v_heads.speech.ctc" in err
    finally:
        monkeypatch.delenv("D2V_TRACE_PLUGINS")
        plugins.reset()


def test_every_hook_is_documented_with_its_signature():
    doc = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    import inspect

    hooks = [name for name in dir(hookspecs) if name.startswith("d2v_")]
    assert hooks, "no hooks found"
    for name in hooks:
        signature = f"{name}{inspect.signature(getattr(hookspecs, name))}"
        assert signature in doc, f"docs/writing-a-plugin.md does not document `{signature}`"
    for name in set(re.findall(r"\bd2v_[a-z_]+(?=\()", doc)):
        assert name in hooks, f"docs mention hook {name} which does not exist"


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A plugin installed beside d2v (a module and its dist-info on sys.path, as pip lays them
    out) that fails to import: its dependency is missing. Only it and one head load."""
    site = tmp_path / "site-packages"
    (site / "d2v_counting").mkdir(parents=True)
    (site / "d2v_counting" / "__init__.py").write_text(
        "import d2v_counting_missing_dependency  # noqa: F401\n"
        "from d2v import hookimpl\n\n\n"
        "@hookimpl\ndef d2v_register(register):\n"
        "    register('head', 'word_count', 'd2v_counting.head:WordCountHead')\n")
    dist_info = site / "d2v_counting-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: d2v-counting\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text("[d2v]\ncounting = d2v_counting\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("D2V_LOAD_PLUGINS", "counting,head-ctc")
    plugins.reset()
    yield
    monkeypatch.delenv("D2V_LOAD_PLUGINS")
    plugins.reset()


def test_a_plugin_that_fails_to_import_is_reported_once_and_the_others_load(broken_plugin, capsys):
    registry = plugins.registry()
    assert registry.get("head", "ctc").plugin == "head-ctc"
    assert plugins.registry() is registry and plugins.plugin_manager().get_plugin("counting") is None
    err = capsys.readouterr().err
    assert err.count("plugin 'counting'") == 1
    assert "ModuleNotFoundError: No module named 'd2v_counting_missing_dependency'" in err
    assert "pip uninstall d2v-counting" in err
    with pytest.raises(SpecError) as error:
        registry.get("head", "word_count", where="model.head.name")
    message = str(error.value)
    assert message.startswith("model.head.name: head 'word_count'") and "unknown" not in message
    assert "plugin 'counting'" in message and "pip uninstall d2v-counting" in message
    assert "Available head components: ctc." in message
    with pytest.raises(SpecError, match=r"did you mean 'ctc'\?"):
        registry.get("head", "ctcc")
