"""``blipkit train stage1|stage2|llava1|llava2 --config FILE --out DIR [--resume] [--key=value ...]``.

``stage1`` / ``stage2`` train a BLIP-2 Q-Former and bridge; ``llava1`` / ``llava2`` a LLaVA-family projector
(``blipkit.train.llava``: feature alignment on captions, then VQA, descriptions and multi-turn chats).

Under torchrun every process runs the same command: ``torchrun --nproc_per_node 2 -m blipkit.train stage1
--config configs/default_stage1.json --out runs/stage1``.
"""

from __future__ import annotations

import argparse
import sys

from blipkit.train.config import LLAVA_STAGES, STAGES, TrainConfig, load_config


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on a ``argparse`` subparsers object; unknown ``--key=value`` go to the config."""
    parser = subparsers.add_parser(
        "train",
        allow_abbrev=False,
        help="train the Q-Former (stage 1), the bridge to the LLM (stage 2) or a LLaVA projector (llava1/2)",
        description="Settings: the TrainConfig defaults, overridden by --config, then by --key=value. Keys: "
        + ", ".join(TrainConfig.__dataclass_fields__),
    )
    parser.add_argument(
        "stage",
        choices=STAGES,
        help="stage1: ITC + ITM + ITG; stage2: the LM loss through the LLM; llava1: a LLaVA projector on "
        "captions (feature alignment); llava2: on VQA, 'Describe the image.' sentences and multi-turn chats "
        "(model 'default-llava' or a LLaVA config JSON; pool=K averages KxK patches)",
    )
    parser.add_argument("--config", help="JSON file of TrainConfig keys")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, losses.csv, losses.png)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    parser.set_defaults(func=cmd_train)
    return parser


def register(subparsers, add_model_args=None) -> None:
    """Hook for ``blipkit.cli``: adds ``train`` (training takes no ``--model``; the config names it)."""
    add_train_parser(subparsers)


def cmd_train(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    """Run one training stage; ``overrides`` are ``--key=value`` strings (e.g. from ``parse_known_args``)."""
    from blipkit.train.distributed import init_distributed, shutdown_distributed

    if args.stage in LLAVA_STAGES:
        from blipkit.train.llava import LlavaTrainer as Trainer
    else:
        from blipkit.train.loop import Trainer

    overrides = list(overrides if overrides is not None else getattr(args, "overrides", None) or [])
    try:
        cfg = load_config(args.config, overrides, stage=args.stage)
    except (ValueError, FileNotFoundError) as e:
        print(f"blipkit train: {e}", file=sys.stderr)
        return 2
    env = init_distributed()
    try:
        final = Trainer(cfg, args.out, resume=args.resume, env=env).run()
        if env.is_main:
            print(f"trained checkpoint: {final}")
    finally:
        shutdown_distributed(env)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blipkit")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args, overrides = parser.parse_known_args(argv)
    return args.func(args, overrides)
