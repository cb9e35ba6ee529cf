"""The optional hooks of the plugin contract (d2v.api.hooks) are what the built-in components
implement and what docs/architecture.md lists: one declaration, checked both ways."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from d2v.api import plugins
from d2v.api.hooks import HOOKS, Hook, hooks_for

ROOT = Path(__file__).resolve().parents[2]
KINDS = sorted({kind for hook in HOOKS for kind in hook.kinds})


def _shape(fn) -> tuple[int, set[str], bool]:
    """(required positional parameters, keyword-only names, takes **kwargs), ``self`` left out."""
    params = [p for name, p in inspect.signature(fn).parameters.items() if name != "self"]
    positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)
    keywords = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return positional, keywords, any(p.kind == p.VAR_KEYWORD for p in params)


def violation(hook: Hook, owner: object) -> str | None:
    """Why ``owner``'s attribute of the hook's name does not match the declaration, or None."""
    value = getattr(owner, hook.name)
    if not hook.is_method:
        return "is a method, the hook is an attribute" if inspect.isroutine(value) else None
    if not callable(value):
        return "is not callable, the hook is a method"
    want_positional, want_keywords, _ = _shape(getattr(hook.contract, hook.name))
    positional, keywords, any_keyword = _shape(value)
    kw_only = {p.name for p in inspect.signature(getattr(hook.contract, hook.name)).parameters.values()
               if p.kind == p.KEYWORD_ONLY}
    if positional != want_positional:
        return f"takes {positional} required positional parameters, the hook passes {want_positional}"
    missing = kw_only - keywords
    if missing and not any_keyword:
        return f"does not accept the keywords {sorted(missing)}"
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_built_in_components_match_the_hooks_they_define(kind):
    checked, wrong = 0, []
    for component in plugins.registry().components(kind):
        owner = component.resolve()
        for name, hook in hooks_for(kind).items():
            if hasattr(owner, name):
                checked += 1
                problem = violation(hook, owner)
                if problem:
                    wrong.append(f"{kind} '{component.name}'.{name} {problem}")
    assert wrong == []
    assert checked or kind == "target"  # every kind but targets has built-ins using hooks


def test_a_mismatched_hook_is_caught():
    class Head:
        def prepare_batch(self, batch, extra):  # one parameter too many
            return batch

        needs_hidden_states = True

    hooks = hooks_for("head")
    assert violation(hooks["prepare_batch"], Head) == "takes 2 required positional parameters, the hook passes 1"
    assert violation(hooks["needs_hidden_states"], Head) is None


def test_the_architecture_doc_lists_exactly_these_hooks():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("| hook | on | used by |"):]
    table = table[:table.index("\n\n")]
    documented = set(re.findall(r"`(\w+)", "\n".join(line.split("|")[1] for line in table.splitlines()[2:])))
    shared_outputs = {"pooler_output", "past_key_values", "encoder_context", "corrupted_mask", "teacher_inputs",
                      "on_bad_example"}  # fields of outputs and batches, and an injected parameter: not hooks
    assert documented - shared_outputs == {hook.name for hook in HOOKS}
