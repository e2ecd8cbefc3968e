"""Zero-shot classification of image files against text labels, streamed in batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from blipkit.errors import UsageError

__all__ = ["classify_files", "parse_labels"]


def parse_labels(text: str) -> list[str]:
    """ "a cat, a dog" -> ["a cat", "a dog"]; blanks and duplicates are dropped."""
    labels = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not labels:
        raise UsageError("--labels needs at least one label, e.g. --labels 'a cat,a dog'")
    return labels


def classify_files(
    model, files: Sequence, labels: Sequence[str], template: str | None = None, batch_size: int = 16
) -> Iterator[dict]:
    """One row per file: ``{"path", "label", "score", "probs"}`` or ``{"path", "error"}``.

    ``template``: None for the model's own (``prompts.classify``)."""
    from blipkit.processing import ImageError, load_image

    for i in range(0, len(files), batch_size):
        images, names = [], []
        for f in files[i : i + batch_size]:
            try:
                images.append(load_image(f))
                names.append(str(f))
            except ImageError as e:
                yield {"path": str(f), "error": e.reason}
        if not images:
            continue
        for name, probs in zip(names, model.classify(images, labels, template=template), strict=True):
            best = max(probs, key=probs.get)
            rounded = {k: round(v, 4) for k, v in sorted(probs.items(), key=lambda kv: -kv[1])}
            yield {"path": name, "label": best, "score": round(probs[best], 4), "probs": rounded}
