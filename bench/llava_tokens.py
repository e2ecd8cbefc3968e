"""What the visual token count of default-llava costs and buys: step time and short-run accuracy per pooling.

For each ``pool`` (1: all 64 DINOv2 patches of the 112 px image; 2: 2x2-averaged, 16 tokens; 4: 4 tokens) it
trains the projector briefly with the real recipe (``llava1`` on captions, then ``llava2`` on VQA, sentences
and chats; the configs in configs/default_llava_*.json with fewer steps), times the steps, and scores the
result on the first ``--limit`` easy-VQA test questions (``blipkit eval vqa-model``'s subset).

    python bench/llava_tokens.py --pools 1,2,4 --stage1-steps 30 --stage2-steps 120 --limit 300
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def train(stage: str, config: str, out: Path, overrides: list[str]) -> tuple[Path, list[float]]:
    """One training stage in this process; (final checkpoint, seconds per logged step after the first)."""
    from blipkit.train.config import load_config
    from blipkit.train.llava import LlavaTrainer

    cfg = load_config(ROOT / config, overrides, stage=stage)
    trainer = LlavaTrainer(cfg, out)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, row: dict) -> None:
        now = time.perf_counter()
        if step > 1:
            times.append(now - last[0])
        last[0] = now

    return trainer.run(on_step), times


def score(checkpoint: Path, limit: int) -> dict:
    import blipkit
    from blipkit.data import easy_vqa
    from blipkit.eval.vqa_model import evaluate_vqa_model

    model = blipkit.load(str(checkpoint))
    report, _ = evaluate_vqa_model(model, easy_vqa.vqa_examples("test"), limit=limit)
    by_type = report.get("by_answer_type", {})
    return {"overall": report["accuracy"], "by_type": by_type, "eval_s": report["seconds"]}


def losses(out: Path) -> float:
    rows = list(csv.DictReader((out / "losses.csv").open()))
    tail = rows[-10:]
    return sum(float(r["loss"]) for r in tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="1,2,4")
    parser.add_argument("--stage1-steps", type=int, default=30)
    parser.add_argument("--stage2-steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/llava-tokens")
    parser.add_argument("--out", default="reports/llava-tokens.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for pool in [int(p) for p in args.pools.split(",")]:
        run = ROOT / args.runs / f"pool{pool}"
        common = [f"--pool={pool}", f"--batch_size={args.batch_size}", f"--threads={args.threads}"]
        common += ["--progress=false", "--export_fp16=false"]
        s1 = [*common, f"--max_steps={args.stage1_steps}", "--warmup_steps=5", "--checkpoint_every=100000"]
        first, t1 = train("llava1", "configs/default_llava_stage1.json", run / "stage1", s1)
        s2 = [*common, f"--max_steps={args.stage2_steps}", "--warmup_steps=10", "--checkpoint_every=100000"]
        s2.append(f"--init_from={first}")
        final, t2 = train("llava2", "configs/default_llava_stage2.json", run / "stage2", s2)
        tokens = 64 // pool**2
        row = {
            "pool": pool,
            "tokens": tokens,
            "stage1_s_per_step": sum(t1) / max(1, len(t1)),
            "stage2_s_per_step": sum(t2) / max(1, len(t2)),
            "stage2_loss_last10": losses(run / "stage2"),
            **score(final, args.limit),
        }
        print(json.dumps(row))
        results.append(row)
    write_report(results, args)


def write_report(results: list[dict], args: argparse.Namespace) -> None:
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# default-llava: visual token count",
        "",
        f"`python bench/llava_tokens.py --pools {args.pools} --stage1-steps {args.stage1_steps} "
        f"--stage2-steps {args.stage2_steps} --batch-size {args.batch_size} --limit {args.limit} "
        f"--threads {args.threads}`",
        "",
        "DINOv2-S/14 at 112 px gives an 8 x 8 patch grid (64 tokens); `pool` averages k x k blocks",
        "before the projector. Each row trains the projector briefly with the real recipe (llava1 on",
        f"captions, then llava2) at batch {args.batch_size} on this machine (2 CPU cores shared with another",
        f"training, bf16 autocast, {args.threads} thread(s): times are upper bounds) and scores greedy",
        f"answers on {args.limit} easy-VQA test questions",
        f"(`blipkit eval vqa-model --limit {args.limit}`'s subset).",
        "",
        "| pool | tokens | llava1 s/step | llava2 s/step | llava2 loss (last 10) | VQA overall | yes/no "
        "| shape | colour |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["by_type"]
        lines.append(
            f"| {r['pool']} | {r['tokens']} | {r['stage1_s_per_step']:.2f} | {r['stage2_s_per_step']:.2f} | "
            f"{r['stage2_loss_last10']:.3f} | {r['overall']:.3f} | {t.get('yes/no', float('nan')):.3f} | "
            f"{t.get('shape', float('nan')):.3f} | {t.get('color', float('nan')):.3f} |"
        )
    lines.append("")
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
