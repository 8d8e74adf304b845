"""The predictions the parity gate compares: PyTorch fp32 (the reference) and an ONNX graph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gata_ft.inference import OnnxClassifier


def forward_scores(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """(logits, features) of a PyTorch classifier, in the order given.

    Features are the input of the classifier's last layer (BERT: the pooler
    output), the tensor the ONNX graphs output as `features`. Batches are sorted
    by length for speed, on whatever device the model is.
    """
    import torch

    head = classifier_layer(model)
    captured = []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    logits = np.zeros((len(texts), head.out_features), dtype=np.float32)
    features = np.zeros((len(texts), head.in_features), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in index],
                    truncation=True,
                    max_length=max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(device)
                captured.clear()
                logits[index] = model(**batch).logits.float().cpu().numpy()
                features[index] = captured[-1].float().cpu().numpy()
    finally:
        hook.remove()
        model.train(was_training)
    return logits, features


def classifier_layer(model):
    """The last linear layer with one output per label: the one that makes the logits."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return next(m for m in reversed(layers) if m.out_features == model.config.num_labels)


def torch_scores(checkpoint: Path, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """PyTorch fp32 (logits, features) of a checkpoint folder, in the order given."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    return forward_scores(model, tokenizer, texts, max_length, batch_size)


def torch_logits(checkpoint: Path, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """PyTorch fp32 scores of a checkpoint folder, in the order given."""
    return torch_scores(checkpoint, texts, max_length, batch_size)[0]


def onnx_scores(
    graph: Path, tokenizer_file: Path, texts, max_length: int, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray | None]:
    """ONNX (logits, features) in the order given; features None for a graph without them.

    int8 graphs are quantized dynamically: each batch's activation range, padding
    included, sets the scales, so a ticket's int8 scores depend on its batch-mates.
    The gate scores int8 one ticket at a time, as the router serves them.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    classifier = OnnxClassifier(graph, tokenizer_file, max_length)
    logits, features = classifier.scores([texts[i] for i in order], batch_size=batch_size)
    result = np.empty_like(logits)
    result[order] = logits
    if features is not None:
        unsorted = np.empty_like(features)
        unsorted[order] = features
        features = unsorted
    return result, features


def onnx_logits(
    graph: Path, tokenizer_file: Path, texts, max_length: int, batch_size: int = 64
) -> np.ndarray:
    """ONNX scores in the order given."""
    return onnx_scores(graph, tokenizer_file, texts, max_length, batch_size)[0]
