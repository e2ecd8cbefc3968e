"""Tiny random transformers BLIP-2 checkpoints shared by the test files (built once; read-only)."""

from __future__ import annotations

import pytest
from hf_tiny import make_blip2


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory):
    """A ``Blip2ForConditionalGeneration`` dir with a tiny OPT and 4 queries."""
    path = tmp_path_factory.mktemp("hf-opt")
    make_blip2(path, llm="opt", num_query_tokens=4)
    return path


@pytest.fixture(scope="session")
def retrieval_dir(tmp_path_factory):
    """A ``Blip2ForImageTextRetrieval`` dir with 4 queries."""
    path = tmp_path_factory.mktemp("hf-retrieval")
    make_blip2(path, retrieval=True, num_query_tokens=4)
    return path
