"""Image datasets in their real on-disk layouts (nothing is downloaded).

* ``image_folder``: ImageNet's layout ``<root>/<split>/<class>/*.JPEG`` (any image extension);
  classes are the sorted directory names unless ``labels`` fixes them.
* ``ade20k``: ADEChallengeData2016's ``<root>/images/<split>/*.jpg`` with
  ``<root>/annotations/<split>/*.png`` (``split``: ``training``/``validation``). Use the image
  processor's ``do_reduce_labels: true`` (as Hugging Face's ADE20K checkpoints): 0 (other)
  becomes 255 (ignored) and class k becomes k-1, so 150 classes remain.

Examples are light dicts (``id``, ``path``, and ``label`` or ``mask``); the processor decodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from d2v.api.errors import SpecError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


def _directory(path: Path, where: str, hint: str) -> Path:
    if not path.is_dir():
        raise SpecError(f"{where}: directory '{path}' does not exist. {hint} d2v never downloads datasets.")
    return path


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolder(Dataset):
    """``<root>/<split>/<class>/**/<image>``; ``max_examples`` keeps the first ones (sorted)."""

    def __init__(self, root: str, split: str | None = "train", labels: list[str] | None = None,
                 max_examples: int | None = None):
        where = f"image_folder '{root}'" + (f" split '{split}'" if split else "")
        base = _directory(Path(root) / split if split else Path(root), where,
                          "Expected <root>/<split>/<class>/*.JPEG (ImageNet layout).")
        dirs = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.label_names = [str(n) for n in labels] if labels is not None else dirs
        missing = [n for n in self.label_names if n not in dirs]
        if not self.label_names or missing:
            raise SpecError(f"{where}: classes {missing or '(none)'} have no directory in '{base}' (present: {dirs[:10]}).")
        self.examples: list[dict[str, Any]] = []
        for label, name in enumerate(self.label_names):
            for path in _images(base / name):
                self.examples.append({"id": f"{name}/{path.stem}", "path": str(path), "label": label})
        if not self.examples:
            raise SpecError(f"{where}: no image files under the class directories of '{base}'.")
        if max_examples is not None:
            self.examples = self.examples[: int(max_examples)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class ADE20k(Dataset):
    """ADEChallengeData2016: every ``images/<split>/<name>.jpg`` with ``annotations/<split>/<name>.png``."""

    def __init__(self, root: str, split: str = "training", max_examples: int | None = None):
        where = f"ade20k '{root}' split '{split}'"
        hint = "Expected ADEChallengeData2016/{images,annotations}/{training,validation}/."
        images = _directory(Path(root) / "images" / split, where, hint)
        annotations = _directory(Path(root) / "annotations" / split, where, hint)
        self.examples = []
        missing = []
        for path in _images(images):
            mask = annotations / (path.stem + ".png")
            if mask.is_file():
                self.examples.append({"id": path.stem, "path": str(path), "mask": str(mask)})
            else:
                missing.append(path.name)
        if missing:
            raise SpecError(f"{where}: {len(missing)} images have no annotation PNG in '{annotations}' "
                            f"(e.g. {missing[:3]}).")
        if not self.examples:
            raise SpecError(f"{where}: no images in '{images}'.")
        if max_examples is not None:
            self.examples = self.examples[: int(max_examples)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]
