"""golden.json: test texts and each graph's probabilities, for loaders to replay at start."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gata_ft.artifact import FP32_GRAPH, GOLDEN, INT8_GRAPH, TOKENIZER
from gata_ft.inference import OnnxClassifier
from gata_ft.metrics import softmax

GOLDEN_COUNT = 32
GOLDEN_TOLERANCE = 1e-3


def golden_texts(texts: Sequence[str]) -> list[str]:
    """Up to GOLDEN_COUNT distinct texts, spread over the set."""
    distinct = list(dict.fromkeys(texts))
    step = max(len(distinct) // GOLDEN_COUNT, 1)
    return distinct[::step][:GOLDEN_COUNT]


def write_golden(
    content: Path, texts: list[str], max_length: int, graphs: list[str] | None = None
) -> str | None:
    """golden.json: texts and each graph's probabilities, one text per call (batch 1).

    A loader replays them one at a time: int8 scores depend on the batch.
    """
    if not texts:
        return None
    probabilities = {}
    for graph in graphs or (FP32_GRAPH, INT8_GRAPH):
        model = OnnxClassifier(content / graph, content / TOKENIZER, max_length)
        logits = np.concatenate([model.logits([text]) for text in texts])
        probabilities[graph] = np.round(softmax(logits), 6).tolist()
    golden = {
        "texts": texts,
        "batch_size": 1,
        "tolerance": GOLDEN_TOLERANCE,
        "probabilities": probabilities,
    }
    (content / GOLDEN).write_text(json.dumps(golden) + "\n", encoding="utf-8")
    return GOLDEN
