"""Evaluation: VQA accuracy, caption metrics (pycocoevalcap), image-text Recall@K, reports."""

from blipkit.eval.recall import recall_at_k
from blipkit.eval.vqa import normalize_answer, score_answer, vqa_accuracy

__all__ = ["normalize_answer", "recall_at_k", "score_answer", "vqa_accuracy"]
