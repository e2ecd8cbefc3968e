"""Caption metrics with pycocoevalcap's scorers: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE is left out).

The scorers are called one by one (``COCOEvalCap.evaluate`` always builds SPICE, which downloads models).
METEOR and the PTB tokenizer run Java; without ``java`` on PATH captions are tokenised by a simple
lower-case, strip-punctuation fallback and METEOR is skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from blipkit.errors import DataError, missing_extra

__all__ = ["JAVA_HELP", "caption_metrics", "java_available", "tokenize"]

JAVA_HELP = (
    "java was not found on PATH: METEOR is skipped and captions are tokenised without the PTB tokenizer "
    "(scores differ slightly from the official ones). Install a Java runtime, e.g. "
    "'sudo apt-get install -y default-jre-headless' (Debian/Ubuntu) or 'brew install openjdk' (macOS)."
)
# tokens the COCO caption evaluation drops after PTB tokenisation
_PUNCTUATION_TOKENS = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
_NON_WORD = re.compile(r"[^\w\s]")

Captions = Mapping[str, Sequence[str]]


def java_available() -> bool:
    return shutil.which("java") is not None


def _package_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra("blipkit eval caption", "pycocoevalcap", "eval")
    return Path(spec.submodule_search_locations[0])


def _ptb_tokenize(lines: list[str]) -> list[str]:
    """Stanford PTBTokenizer (the jar pycocoevalcap ships), fed on stdin: no temp file in the package dir."""
    jar = _package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    text = "\n".join(line.replace("\n", " ") for line in lines)
    done = subprocess.run(cmd, input=text.encode(), capture_output=True, check=True)
    out = done.stdout.decode().split("\n")
    out += [""] * (len(lines) - len(out))  # trailing empty captions
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATION_TOKENS)
        for line in out[: len(lines)]
    ]


def _simple_tokenize(lines: list[str]) -> list[str]:
    return [" ".join(_NON_WORD.sub(" ", line.lower()).split()) for line in lines]


def tokenize(captions: Captions, use_java: bool | None = None) -> dict[str, list[str]]:
    """{id: [tokenised caption, ...]}: PTB tokenizer with Java, the simple fallback without."""
    use_java = java_available() if use_java is None else use_java
    keys = [k for k, caps in captions.items() for _ in caps]
    flat = [c for caps in captions.values() for c in caps]
    tokens = (_ptb_tokenize if use_java else _simple_tokenize)(flat)
    out: dict[str, list[str]] = {k: [] for k in captions}
    for k, t in zip(keys, tokens, strict=True):
        out[k].append(t)
    return out


def caption_metrics(
    predictions: Mapping[str, str], references: Captions, use_java: bool | None = None
) -> dict:
    """Corpus scores ``{"metrics": {...}, "per_image": {id: {...}}, "tokenizer", "skipped"}``.

    Every image with references needs a prediction (and vice versa); ids are compared as strings.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = sorted(set(references) - set(predictions))
    extra = sorted(set(predictions) - set(references))
    if missing or extra:
        raise DataError(
            f"predictions and references must cover the same images: {len(missing)} without a prediction "
            f"(e.g. {missing[:3]}), {len(extra)} without references (e.g. {extra[:3]})"
        )
    if not references:
        raise DataError("no images to score")
    if any(not refs for refs in references.values()):
        raise DataError("every image needs at least one reference caption")
    use_java = java_available() if use_java is None else use_java
    gts = tokenize(references, use_java)
    res = tokenize({k: [predictions[k]] for k in references}, use_java)
    scorers: list[tuple[object, list[str]]] = [
        (Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]),
        (Rouge(), ["ROUGE-L"]),
        (Cider(), ["CIDEr"]),
    ]
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.insert(1, (Meteor(), ["METEOR"]))
    ids = list(references)
    metrics: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {k: {} for k in ids}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its statistics
            score, scores = scorer.compute_score({k: gts[k] for k in ids}, {k: res[k] for k in ids})
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, total, each in zip(names, score, scores, strict=True):
            metrics[name] = float(total)
            for k, v in zip(ids, each, strict=True):
                per_image[k][name] = float(v)
        _close(scorer)
    return {
        "metrics": metrics,
        "images": len(ids),
        "tokenizer": "ptb" if use_java else "simple",
        "skipped": [] if use_java else ["METEOR"],
        "per_image": per_image,
    }


def _close(scorer: object) -> None:
    """Stop a scorer's Java process (METEOR) now, not at garbage collection (twice is harmless)."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None:
        with scorer.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()
