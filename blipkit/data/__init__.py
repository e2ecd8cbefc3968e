"""Datasets: easy-VQA, and your own images with captions (JSONL/CSV) or questions and answers (JSONL)."""

from blipkit.data.records import CaptionExample, VqaExample

__all__ = ["CaptionExample", "VqaExample"]
