"""The predictions the parity gate compares: PyTorch fp32 (the reference) and an ONNX graph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gata_ft.inference import OnnxClassifier


def torch_logits(checkpoint: Path, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """PyTorch fp32 scores in the order given (batches sorted by length for speed)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    result = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in index],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            result[index] = model(**batch).logits.float().numpy()
    return result


def onnx_logits(
    graph: Path, tokenizer_file: Path, texts, max_length: int, batch_size: int = 64
) -> np.ndarray:
    """ONNX scores in the order given.

    int8 graphs are quantized dynamically: each batch's activation range, padding
    included, sets the scales, so a ticket's int8 scores depend on its batch-mates.
    The gate scores int8 one ticket at a time, as the router serves them.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    classifier = OnnxClassifier(graph, tokenizer_file, max_length)
    logits = classifier.logits([texts[i] for i in order], batch_size=batch_size)
    result = np.empty_like(logits)
    result[order] = logits
    return result
