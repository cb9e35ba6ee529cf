"""Class names for classification heads: one rule for every head, so ``label_names`` means the
same in an audio, text or image spec (and becomes ``id2label`` on export)."""

from __future__ import annotations

from d2v.api.errors import SpecError


def resolve_label_names(num_labels: int | None, label_names: list[str] | None, where: str, *,
                        default: bool = True) -> list[str] | None:
    """``label_names`` validated, else ``LABEL_0 .. LABEL_{n-1}`` (Hugging Face's defaults; ``None``
    when ``default`` is false). ``num_labels`` may accompany the names but must agree."""
    if label_names is None:
        if num_labels is None or isinstance(num_labels, bool) or int(num_labels) < 1:
            raise SpecError(f"{where}: set num_labels (a positive integer) or label_names (a list of names), "
                            f"got num_labels={num_labels!r}.")
        return [f"LABEL_{i}" for i in range(int(num_labels))] if default else None
    if any(isinstance(n, bool) for n in label_names):
        raise SpecError(f"{where}: label_names {label_names!r} holds true/false: YAML reads unquoted yes, no, on "
                        f"and off as booleans; quote them (\"yes\").")
    names = [str(n) for n in label_names]
    if not names or len(set(names)) != len(names):
        raise SpecError(f"{where}: label_names must be a non-empty list of distinct names, got {label_names!r}.")
    if num_labels is not None and int(num_labels) != len(names):
        raise SpecError(f"{where}: num_labels={num_labels} but label_names has {len(names)} entries; "
                        f"drop num_labels (it follows label_names).")
    return names
