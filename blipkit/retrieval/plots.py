"""Pictures: a similarity heatmap with image thumbnails (matplotlib) and contact sheets (PIL)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw

from blipkit.extras import require

__all__ = ["contact_sheet", "similarity_heatmap"]


def similarity_heatmap(
    images: Sequence, texts: Sequence[str], sims, out: str | os.PathLike, title: str | None = None
) -> None:
    """Texts down the side, image thumbnails along the top, the (N_img, N_txt) scores in the cells."""
    matplotlib = require("matplotlib", "a similarity plot (--plot)", "eval")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from blipkit.processing import load_image

    values = np.asarray(sims, dtype=float).T  # (T, N)
    n_txt, n_img = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * n_img + 3.0), max(3.0, 0.6 * n_txt + 2.0)))
    shown = ax.imshow(values, cmap="viridis", aspect="equal", vmin=values.min(), vmax=values.max())
    for i, item in enumerate(images):
        ax.imshow(_square_thumb(load_image(item), 128), extent=(i - 0.5, i + 0.5, -0.6, -1.6))
    middle = (values.max() + values.min()) / 2
    for t in range(n_txt):
        for i in range(n_img):
            color = "black" if values[t, i] > middle else "white"
            ax.text(i, t, f"{values[t, i]:.2f}", ha="center", va="center", fontsize=9, color=color)
    ax.set_yticks(range(n_txt), [s if len(s) <= 40 else s[:37] + "..." for s in texts])
    ax.set_xticks([])
    ax.set_xlim(-0.5, n_img - 0.5)
    ax.set_ylim(n_txt - 0.5, -1.6)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    fig.colorbar(shown, ax=ax, fraction=0.03, pad=0.02)
    ax.set_title(title or "Image-text similarity (ITC)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


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
            draw.text((x, y + thumb + 1), str(labels[n])[: thumb // 6], fill="black")
    sheet.save(out)
