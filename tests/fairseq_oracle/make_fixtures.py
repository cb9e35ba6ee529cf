"""Write the fairseq-produced fixtures (run in the oracle venv; see README.md).

    python tests/fairseq_oracle/make_fixtures.py            # every family
    python tests/fairseq_oracle/make_fixtures.py audio1 text2

Each family module (``audio.py``, ``text.py``, ``vision.py``) maps family names to a function
that writes ``fixtures/<family>/``: ``checkpoint.pt`` as fairseq's ``Trainer`` saved it and
``outputs.pt``, plain tensors (loadable with ``weights_only=True``) of what fairseq computed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
FAMILY_MODULES = ("audio", "text", "vision")


def families() -> dict:
    found = {}
    for name in FAMILY_MODULES:
        if (HERE / f"{name}.py").exists():
            found.update(importlib.import_module(name).FAMILIES)
    return found


def main(names: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    import fairseq_env

    fairseq_env.load_fairseq()
    table = families()
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {sorted(table)}")
    for name in names or sorted(table):
        out = FIXTURES / name
        out.mkdir(parents=True, exist_ok=True)
        table[name](out)
        size = sum(f.stat().st_size for f in out.iterdir()) / 1e3
        print(f"{name}: {size:.0f} kB in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
