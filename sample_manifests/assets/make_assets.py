"""Regenerate the sample images: ``python sample_manifests/assets/make_assets.py``.

They are synthetic on purpose: small (well under 100 KB), real JPEG files that pass Kling's
input rules (≥300 px per side, aspect within 1:2.5..2.5:1), so the samples run on a fresh clone.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent


def scene(path: Path, size: tuple[int, int], top: tuple[int, int, int],
          bottom: tuple[int, int, int], shape: str, accent: tuple[int, int, int]) -> None:
    """A vertical gradient with one simple shape: enough to look like a product still."""
    width, height = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / (height - 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.line([(0, y), (width, y)], fill=colour)
    cx, cy, r = width // 2, height // 2, min(width, height) // 4
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=accent)
    elif shape == "box":
        draw.rounded_rectangle([cx - r, cy - r // 2, cx + r, cy + r], radius=r // 5, fill=accent)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=accent)
    img.save(path, "JPEG", quality=82, optimize=True)


def main() -> None:
    """Write every sample image."""
    scene(HERE / "lantern.jpg", (640, 360), (20, 30, 60), (200, 120, 40), "circle", (255, 210, 90))
    scene(HERE / "handbag_first.jpg", (640, 360), (240, 230, 220), (150, 120, 110), "box",
          (120, 40, 40))
    scene(HERE / "handbag_last.jpg", (640, 360), (250, 245, 240), (190, 170, 160), "box",
          (160, 60, 50))
    products = HERE / "products"
    products.mkdir(exist_ok=True)
    palette = {
        "watch": ((30, 30, 40), (120, 130, 150), "circle", (210, 210, 220)),
        "sneaker": ((240, 240, 240), (180, 200, 220), "triangle", (230, 80, 60)),
        "perfume": ((60, 20, 50), (200, 150, 190), "box", (240, 200, 120)),
        "headphones": ((10, 10, 10), (80, 80, 90), "circle", (40, 160, 220)),
        "backpack": ((90, 110, 70), (200, 210, 170), "box", (60, 80, 50)),
    }
    for name, (top, bottom, shape, accent) in palette.items():
        scene(products / f"{name}.jpg", (600, 600), top, bottom, shape, accent)


if __name__ == "__main__":
    main()
