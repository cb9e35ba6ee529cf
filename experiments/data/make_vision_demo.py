"""Generate the vision demo set deterministically: 32x32 rendered shapes (circle, square,
triangle, cross) on noisy backgrounds, with their class and a segmentation mask.

Layouts written (both read by the real dataset plugins):

* ``experiments/data/vision_demo/shapes/{train,valid}/<shape>/*.png`` (image_folder)
* ``experiments/data/vision_demo/ADEChallengeData2016/{images,annotations}/{training,validation}/``
  (ade20k; mask 0 = background, k = shape k, used with do_reduce_labels: false)

    python experiments/data/make_vision_demo.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "cross"]
SIZE = 32
OUT = Path(__file__).parent / "vision_demo"


def render(shape: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    background = rng.integers(0, 256, 3)
    image = Image.fromarray(np.clip(background + rng.normal(0, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    r = int(rng.integers(9, 15))
    cx, cy = (int(v) for v in rng.integers(r, SIZE - r, 2))
    colour = tuple(int(c) for c in (255 - background + rng.integers(-40, 40, 3)).clip(0, 255))
    for target, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(mask), shape + 1)):
        box = [cx - r, cy - r, cx + r, cy + r]
        if SHAPES[shape] == "circle":
            target.ellipse(box, fill=fill)
        elif SHAPES[shape] == "square":
            target.rectangle(box, fill=fill)
        elif SHAPES[shape] == "triangle":
            target.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            w = max(2, r // 3)
            target.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            target.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image, mask


def main(per_class: dict[str, int] = {"train": 150, "valid": 25}) -> None:
    rng = np.random.default_rng(1234)
    ade = {"train": "training", "valid": "validation"}
    for split, count in per_class.items():
        for index in range(count):
            for shape, name in enumerate(SHAPES):
                image, mask = render(shape, rng)
                folder = OUT / "shapes" / split / name
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{index:03d}.png")
                stem = f"{name}_{index:03d}"
                for sub, pic, ext in (("images", image, ".jpg"), ("annotations", mask, ".png")):
                    target = OUT / "ADEChallengeData2016" / sub / ade[split]
                    target.mkdir(parents=True, exist_ok=True)
                    pic.save(target / (stem + ext), quality=95) if ext == ".jpg" else pic.save(target / (stem + ext))


if __name__ == "__main__":
    main()
