"""Pictures: a similarity heatmap with image thumbnails (matplotlib) and contact sheets (PIL)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from blipkit.extras import require

__all__ = ["contact_sheet", "similarity_heatmap"]


def similarity_heatmap(
    images: Sequence, texts: Sequence[str], sims, out: str | os.PathLike, title: str | None = None
):
    """Images down the side (name and thumbnail), texts along the top, the (N_img, N_txt) scores in the
    cells, as ``similarity`` prints them; returns the heatmap's Axes (its figure is closed)."""
    matplotlib = require("matplotlib", "a similarity plot (--plot)", "eval")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from blipkit.processing import load_image

    values = np.asarray(sims, dtype=float)  # (N, T)
    n_img, n_txt = values.shape
    columns = [_cut(t, 40) for t in texts]
    label_in = 0.07 * max(len(c) for c in columns) * 0.6  # the slanted text labels above the cells
    fig, ax = plt.subplots(figsize=(1.0 * (n_txt + 1) + 2.5, 1.0 * n_img + 1.0 + label_in))
    shown = ax.imshow(values, cmap="viridis", aspect="equal", vmin=values.min(), vmax=values.max())
    for i, item in enumerate(images):
        ax.imshow(_square_thumb(load_image(item), 128), extent=(-1.6, -0.6, i + 0.5, i - 0.5))
    middle = (values.max() + values.min()) / 2
    for i in range(n_img):
        for t in range(n_txt):
            color = "black" if values[i, t] > middle else "white"
            ax.text(t, i, f"{values[i, t]:.2f}", ha="center", va="center", fontsize=9, color=color)
    ax.xaxis.tick_top()
    ax.set_xticks(range(n_txt), columns, rotation=35, ha="left", rotation_mode="anchor")
    names = [_cut(os.path.basename(str(x)), 24) if isinstance(x, (str, os.PathLike)) else "" for x in images]
    ax.set_yticks(range(n_img), names)
    ax.tick_params(length=0)
    ax.set_xlim(-1.6, n_txt - 0.5)
    ax.set_ylim(n_img - 0.5, -0.5)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02, shrink=min(1.0, 0.3 + 0.2 * n_img))
    ax.set_title(title or "Image-text similarity (ITC)")
    fig.savefig(out, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return ax


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending with an ellipsis when it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _square_thumb(image: Image.Image, size: int) -> Image.Image:
    """``image`` shrunk to fit ``size`` x ``size`` and centred on white (keeps its aspect ratio)."""
    image = image.copy()
    image.thumbnail((size, size))
    square = Image.new("RGB", (size, size), "white")
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return square


def contact_sheet(
    images: Sequence, out: str | os.PathLike, thumb: int = 128, columns: int = 8, labels: Sequence[str] = ()
) -> None:
    """A grid of thumbnails (letterboxed to ``thumb`` px) with an optional caption under each."""
    from blipkit.processing import ImageError, load_image

    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    label_h = 14 if labels else 0
    cell_w, cell_h = thumb + 4, thumb + 4 + label_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, item in enumerate(images):
        x, y = (n % columns) * cell_w + 2, (n // columns) * cell_h + 2
        try:
            sheet.paste(_square_thumb(load_image(item), thumb), (x, y))
        except ImageError:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), outline="red")
        if labels:
            draw.text((x, y + thumb + 1), _fit(draw, str(labels[n]), thumb), fill="black")
    sheet.save(out)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` cut to ``width`` pixels in ``draw``'s font, ending with an ellipsis when it was cut."""
    ellipsis = "\u2026" if isinstance(draw.getfont(), ImageFont.FreeTypeFont) else "..."
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + ellipsis) > width:
        text = text[:-1]
    return text + ellipsis
