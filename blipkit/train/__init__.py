"""Training: stage 1 (ITC/ITM/ITG on the Q-Former), stage 2 (LM loss through the frozen LLM), cached
frozen-encoder features, data parallelism under torchrun, exact resume.

``blipkit train stage1|stage2 --config configs/NAME.json --out DIR [--resume] [--key=value ...]``
``torchrun --nproc_per_node N -m blipkit.train stage1|stage2 --config configs/NAME.json --out DIR``
"""

from blipkit.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
