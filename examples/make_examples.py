"""Draw the example scenes in this folder: coloured shapes at sizes and places easy-VQA never uses."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
SCENES = {
    # name: (canvas (W, H), background, shape, colour, box (x0, y0, x1, y1))
    "red_circle.png": ((320, 240), (235, 235, 235), "circle", (220, 30, 30), (40, 30, 190, 180)),
    "blue_triangle.png": ((256, 256), (250, 250, 250), "triangle", (30, 60, 220), (110, 100, 240, 230)),
    "green_rectangle.png": ((200, 300), (225, 225, 240), "rectangle", (20, 180, 20), (30, 160, 170, 280)),
    "yellow_circle.jpg": ((480, 360), (90, 90, 110), "circle", (235, 220, 40), (260, 60, 430, 230)),
}


def draw(size, background, shape, colour, box) -> Image.Image:
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "rectangle":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return img


if __name__ == "__main__":
    for name, spec in SCENES.items():
        draw(*spec).save(HERE / name, quality=92)
        print(HERE / name)
