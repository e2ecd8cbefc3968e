"""Write ``reports/default-llava.md``: the shipped default-llava on easy-VQA and the example images.

    python bench/default_llava_report.py --run runs/default-llava [--vqa runs/default-llava/vqa.json]
                                         [--model default-llava] [--out reports/default-llava.md]

``--vqa`` is the JSON of ``blipkit eval vqa-model --model default-llava --dataset easy-vqa --limit 1000
--out FILE`` (scripts/train_default_llava.sh writes it); without it the same 1,000 questions are answered
here. Training figures come from the run's ``times.txt`` and ``losses.csv`` files.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import blipkit
from blipkit.convert import blipkit_llava

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.png")) + sorted((ROOT / "examples").glob("*.jpg"))


def vqa(model: blipkit.Model, file: Path | None, limit: int) -> dict:
    if file is not None and file.exists():
        return json.loads(file.read_text())
    from blipkit.data import easy_vqa
    from blipkit.eval.vqa_model import evaluate_vqa_model

    return evaluate_vqa_model(model, easy_vqa.vqa_examples("test"), limit=limit)[0]


def stage_rows(run: Path) -> dict[str, dict]:
    """Per stage: steps, last losses, batch size and wall-clock minutes (times.txt)."""
    stamps: dict[str, int] = {}
    times = run / "times.txt"
    if times.exists():
        for line in times.read_text().split("\n"):
            if line.strip():
                name, value = line.split()
                stamps.setdefault(name, int(value)) if name.endswith("start") else stamps.update(
                    {name: int(value)}
                )
    out = {}
    for stage in ("stage1", "stage2"):
        log = run / stage / "losses.csv"
        if not log.exists():
            continue
        rows = list(csv.DictReader(log.open()))
        config = json.loads((run / stage / "train_config.json").read_text())
        start, end = stamps.get(f"{stage}-start"), stamps.get(f"{stage}-end")
        out[stage] = {
            "steps": len(rows),
            "batch_size": config["batch_size"],
            "lr": config["lr"],
            "threads": config["threads"],
            "first_loss": float(rows[0]["loss"]),
            "last_loss": sum(float(r["loss"]) for r in rows[-20:]) / len(rows[-20:]),
            "minutes": round((end - start) / 60, 1) if start and end else None,
        }
    return out


def examples(model: blipkit.Model) -> list[dict]:
    rows = []
    for image in EXAMPLES:
        chat = model.chat(image)
        first = chat.send("What shape is it?")
        second = chat.send("And its colour?")
        rows.append(
            {
                "image": image.name,
                "caption": model.caption(image)[0],
                "ask_shape": model.ask(image, "what shape is in the image?"),
                "ask_colour": model.ask(image, "what color is the shape?"),
                "chat": [["What shape is it?", first], ["And its colour?", second]],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-llava")
    parser.add_argument("--run", default="runs/default-llava")
    parser.add_argument("--vqa", default=None)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--out", default="reports/default-llava.md")
    args = parser.parse_args()
    model = blipkit.load(args.model)
    cfg = model.model.config
    report = vqa(model, Path(args.vqa) if args.vqa else None, args.limit)
    by_type = report.get("by_answer_type", {})
    weights = Path(model.path) / blipkit_llava.PROJECTOR_FILE if hasattr(model, "path") else None
    if weights is None or not weights.exists():
        weights = blipkit.config.WEIGHTS_DIR / "default-llava" / blipkit_llava.PROJECTOR_FILE
    trained = sum(p.numel() for p in model.model.projector.parameters())
    stages = stage_rows(ROOT / args.run)
    shown = examples(model)
    lines = [
        "# default-llava: the LLaVA-style embedded default",
        "",
        '`blipkit.load("default-llava")`: DINOv2-S/14 (frozen, 112 px: an 8 x 8 patch grid) '
        f"{'all 64 patches' if cfg.pool == 1 else f'averaged over {cfg.pool} x {cfg.pool} blocks'} "
        f"-> **{model.model.num_visual_tokens} visual tokens** -> 2-layer GELU MLP projector (trained) -> "
        "SmolLM2-135M-Instruct (frozen) in its own chat template, the image spliced in at `<image>`.",
        f"Trained parameters: **{trained:,}** (the projector only; no LoRA). Shipped: "
        f"`blipkit/weights/default-llava/` = config.json + {blipkit_llava.PROJECTOR_FILE} "
        f"(**{weights.stat().st_size / 1e6:.2f} MB**, fp16); the frozen parts are referenced by asset name.",
        "Retrain: `scripts/train_default_llava.sh` (configs/default_llava_stage1.json, "
        "configs/default_llava_stage2.json; token-count measurements: reports/llava-tokens.md).",
        "",
        "## Training (CPU, this machine)",
        "",
        "| stage | data | steps x batch | lr | threads | loss first -> last 20 | wall-clock |",
        "|---|---|---|---|---|---|---|",
    ]
    data = {
        "stage1": "caption requests -> derived caption (feature alignment)",
        "stage2": "easy-VQA questions, 'Describe the image.' sentences, captions, 2-3 turn chats",
    }
    for stage, r in stages.items():
        minutes = f"{r['minutes']} min" if r["minutes"] is not None else "-"
        lines.append(
            f"| {stage} | {data[stage]} | {r['steps']} x {r['batch_size']} | {r['lr']} | {r['threads']} | "
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {minutes} |"
        )
    lines += [
        "",
        f"Loss curves: `{args.run}/stage1/losses.png`, `{args.run}/stage2/losses.png`.",
        "",
        f"## easy-VQA test, {report.get('questions', args.limit)} questions "
        f"(`blipkit eval vqa-model --model default-llava --dataset easy-vqa --limit {args.limit}`)",
        "",
        "| overall | yes/no | shape | colour |",
        "|---|---|---|---|",
        f"| {report['accuracy']:.4f} | {by_type.get('yes/no', float('nan')):.4f} | "
        f"{by_type.get('shape', float('nan')):.4f} | {by_type.get('color', float('nan')):.4f} |",
        "",
        "## The example images",
        "",
        '| image | `m.caption(img)` | `m.ask(img, "what shape is in the image?")` | '
        '`m.ask(img, "what color is the shape?")` | chat: "What shape is it?" -> "And its colour?" |',
        "|---|---|---|---|---|",
    ]
    for r in shown:
        chat = " / ".join(a for _, a in r["chat"])
        lines.append(f"| {r['image']} | {r['caption']} | {r['ask_shape']} | {r['ask_colour']} | {chat} |")
    lines.append("")
    out = ROOT / args.out
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(
        json.dumps(
            {
                "vqa": {k: v for k, v in report.items() if k != "per_question"},
                "stages": stages,
                "examples": shown,
                "trained_parameters": trained,
            },
            indent=2,
        )
        + "\n"
    )
    total = sum(r["minutes"] or 0 for r in stages.values())
    training = {
        "command": "scripts/train_default_llava.sh (blipkit train llava1 / llava2, configs/default_llava_*)",
        "machine": "2 CPU cores shared with another training, bf16 autocast (AMX)",
        **{
            f"{k} ({data[k]})": f"{r['steps']} steps x {r['batch_size']}, {r['minutes']} min"
            for k, r in stages.items()
        },
        "total wall clock": f"about {round(total)} minutes",
        "shipped": f"blipkit/weights/default-llava: config.json + {blipkit_llava.PROJECTOR_FILE} "
        f"(fp16, {weights.stat().st_size / 1e6:.2f} MB)",
    }
    (ROOT / "reports" / "default-llava-training.json").write_text(json.dumps(training, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
