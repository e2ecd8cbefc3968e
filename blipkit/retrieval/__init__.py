"""Image indexes and search (ITC top-K, ITM re-ranking), zero-shot classification, plots, clusters."""

from blipkit.retrieval.index import ImageIndex, build_index
from blipkit.retrieval.search import Hit, Searcher, rerank

__all__ = ["Hit", "ImageIndex", "Searcher", "build_index", "rerank"]
