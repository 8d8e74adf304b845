"""CPU inference with onnxruntime, the `tokenizers` library and numpy only.

This module must not import torch, transformers or optimum: the router loads
it on a small serverless endpoint. A test checks that in a fresh interpreter.

    model = Model.load("model.tar.gz")          # or the extracted folder
    model.predict(["my card was declined"], top_k=3)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gata_ft import text as text_rules
from gata_ft.archive import safe_extract
from gata_ft.artifact import (
    GOLDEN,
    GRAPHS,
    METADATA,
    RUNTIME_FILES,
    SCOPE,
    TOKENIZER,
    ArtifactInfo,
)
from gata_ft.artifact import verify_files as check_files
from gata_ft.errors import ArtifactError, GataError
from gata_ft.inference import (
    STOP_SPINNING,
    UNFUSED,
    OnnxClassifier,
    has_vnni,
    pool_made,
    shared_pool,
)
from gata_ft.metrics import softmax, unsure
from gata_ft.scope import Scope

log = logging.getLogger("gata_ft")
CHARS_PER_TOKEN_LIMIT = 32  # texts are cut at max_length x this before tokenizing
OFF = ("0", "false", "no", "off")


class InputError(GataError):
    """A text given to predict() cannot be classified."""


@dataclass(frozen=True)
class Prediction:
    label: int  # the original queue id (Zendesk group id)
    probability: float  # calibrated when the artifact was (metadata calibration)
    top_k: tuple[tuple[int, float], ...] = ()
    route: bool | None = None  # confident, in scope, not the fallback; None: not calibrated
    out_of_scope: float | None = None  # distance / its threshold: above 1, no queue fits
    queue: int | None = None  # where to send it: label if routed, else the fallback queue

    def to_dict(self) -> dict:
        # Labels as strings: JSON readers in other languages lose digits above 2**53.
        result = {"label": str(self.label), "probability": round(self.probability, 6)}
        if self.route is not None:
            result["route"] = self.route
            result["queue"] = None if self.queue is None else str(self.queue)
        if self.out_of_scope is not None:
            result["out_of_scope"] = round(self.out_of_scope, 4)
        if self.top_k:
            result["top_k"] = [
                {"label": str(label), "probability": round(p, 6)} for label, p in self.top_k
            ]
        return result


def _trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim).

    Without it the memory of dropped sessions stays resident: the parent of
    2 server workers, BANKING77 MiniLM with escalation, kept 127 MB (PSS) after
    releasing its sessions, 52 to 54 MB with it (bench/workers.py).
    """
    # not glibc (musl, macOS: AttributeError; Windows: TypeError): the memory stays mapped
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).malloc_trim(0)


def _exported_unfused(metadata: dict) -> bool:
    """Whether the export left out every fusion this runtime leaves out (onnx.unfused)."""
    recorded = (metadata.get("onnx") or {}).get("unfused")
    return isinstance(recorded, list) and all(name in recorded for name in UNFUSED)


class Model:
    """A gata-ft artifact ready to classify tickets on a CPU."""

    def __init__(
        self,
        folder: Path,
        graph: str = "serve",
        threads: int = 0,
        normalize=True,
        verify_files: bool = True,
        escalate: bool | None = None,
        shared_threads: bool = False,
    ):
        self.folder = Path(folder)
        info = ArtifactInfo.read(self.folder)
        self.metadata = info.metadata
        if graph == "serve":  # GATA_GRAPH picks when the caller did not
            graph = os.environ.get("GATA_GRAPH") or graph
        if graph == "serve":  # the fastest graph that passed the gate and is safe on this CPU
            self.graph = info.vnni_graph if info.vnni_graph and has_vnni() else info.serve_graph
        elif graph in GRAPHS:
            self.graph = GRAPHS[graph]
        else:
            raise ArtifactError(
                f"graph (--graph, GATA_GRAPH): expected serve, {', '.join(GRAPHS)}, found {graph!r}"
            )
        self.labels = info.labels
        self.max_length = info.max_length
        self.pattern = info.text_pattern
        self.threshold = info.threshold
        # fitted without a threshold: no probability reached the target, route nothing
        self.routes = info.calibrated
        self.fallback_label = info.fallback_label
        self.distance_threshold = info.distance_threshold
        self.scope = None
        self.normalize = normalize
        # int8 answers the model is unsure of are scored again in fp32 (serve.escalate)
        if escalate is None:  # an explicit choice wins over GATA_ESCALATE
            escalate = os.environ.get("GATA_ESCALATE", "").strip().lower() not in OFF
        self.escalation = info.escalations.get(self.graph) if escalate else None
        needed = [self.graph, TOKENIZER] + ([SCOPE] if info.distance_threshold is not None else [])
        if self.escalation is not None:
            needed.append(self.escalation[0])
        missing = [name for name in needed if not (self.folder / name).is_file()]
        if missing:
            raise ArtifactError(
                f"{self.folder}: expected {', '.join(missing)} in the model, found "
                f"{'it' if len(missing) == 1 else 'them'} missing; export it again "
                "(gata-ft export)"
                + ("; GATA_ESCALATE=0 serves the int8 graph alone" if self.escalation else "")
            )
        if (self.folder / GOLDEN).is_file():
            needed.append(GOLDEN)
        if verify_files:  # a changed graph answers wrongly without a word: refuse it
            check_files(self.folder, self.metadata, needed)
        if info.distance_threshold is not None:
            self.scope = Scope.load(self.folder / SCOPE)
        if self.graph != GRAPHS["fp32"] and not _exported_unfused(self.metadata):
            log.info(
                "%s was exported with onnxruntime's fused SkipLayerNormalization, whose CPU "
                "kernel is the slower one (the int8 graph ~10%% slower at batch 1): "
                "`gata-ft export MODEL -o NEW.tar.gz --test DIR` exports it again",
                self.folder,
            )
        # the int8 and the fp32 session take turns: one pool for both where the process
        # owns its sessions, else neither left spinning (see STOP_SPINNING)
        shared = (shared_threads or pool_made()) and shared_pool(threads)
        config = STOP_SPINNING if self.escalation is not None and not shared else None
        self.classifier = OnnxClassifier(
            self.folder / self.graph, self.folder / TOKENIZER, self.max_length, threads, config,
            shared,
        )  # fmt: skip
        self.second = None
        if self.escalation is not None:
            self.second = OnnxClassifier(
                self.folder / self.escalation[0], self.folder / TOKENIZER, self.max_length,
                threads, config, shared,
            )  # fmt: skip

    @classmethod
    def load(
        cls,
        path: Path | str,
        graph="serve",
        threads=0,
        verify_golden=False,
        normalize=True,
        verify_files=True,
        escalate=None,
        shared_threads=False,
    ):
        """Load a model.tar.gz (extracting only what inference needs) or an extracted folder.

        A folder holding no metadata.json but a model.tar.gz (a model folder tarred
        again) loads that tarball. Every file read is checked against its sha256 in
        metadata.json unless `verify_files` is false. When the served int8 graph names
        an escalation (serve.escalate), tickets it is unsure of are scored again by
        the fp32 graph, as the parity gate measured; `escalate=False` (or, when
        not given, GATA_ESCALATE=0) serves the int8 graph alone. `shared_threads`:
        the sessions use the process's one onnxruntime pool (made with `threads` by
        the first such load), for a process that owns all its onnxruntime sessions
        (the server): once that pool exists, onnxruntime refuses sessions with their
        own pool, so every later load in the process shares it too.
        """
        path = Path(path)
        nested = path / "model.tar.gz"
        if path.is_dir() and not (path / METADATA).is_file() and nested.is_file():
            log.info("%s holds model.tar.gz rather than its files: loading that", path)
            path = nested
        if path.is_file():
            scratch = tempfile.TemporaryDirectory(prefix="gata-ft-model-")
            try:
                safe_extract(path, Path(scratch.name), only=set(RUNTIME_FILES))
                model = cls(
                    Path(scratch.name), graph, threads, normalize, verify_files, escalate,
                    shared_threads,
                )  # fmt: skip
            except BaseException:
                scratch.cleanup()
                raise
            model._scratch = scratch  # removed with the model, or by close()
        elif path.is_dir():
            model = cls(path, graph, threads, normalize, verify_files, escalate, shared_threads)
        else:
            raise ArtifactError(f"{path}: no such model (a model.tar.gz or its extracted folder)")
        if verify_golden:
            model.verify_golden()
        return model

    def release_session(self) -> None:
        """Free the onnxruntime sessions and give their memory back to the system."""
        # the folder stays: the server's worker processes load their own sessions from it
        self.classifier = self.second = None
        gc.collect()
        _trim_heap()

    def close(self) -> None:
        """Remove the folder a tarball was extracted to (nothing for a folder given)."""
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            scratch.cleanup()

    def verify_golden(self) -> int:
        """Replay golden.json; raise ArtifactError on a mismatch. Returns the texts checked."""
        golden_file = self.folder / GOLDEN
        if not golden_file.is_file():
            raise ArtifactError(
                f"{self.folder}: no {GOLDEN} to verify (exported without test data)"
            )
        golden = json.loads(golden_file.read_text(encoding="utf-8"))
        replayed = [(self.graph, self.classifier)]
        if self.second is not None:  # the graph escalated tickets get: checked the same way
            replayed.append((self.escalation[0], self.second))
        for graph, classifier in replayed:
            expected = np.asarray(golden["probabilities"][graph])
            for i, text in enumerate(golden["texts"]):
                got = softmax(classifier.logits([text]))[0]
                difference = float(np.abs(got - expected[i]).max())
                if difference > golden["tolerance"]:
                    raise ArtifactError(
                        f"golden sample {i} ({text!r}) gives probabilities up to "
                        f"{difference:.4f} away from the export's (tolerance "
                        f"{golden['tolerance']}): this tokenizer or onnxruntime does not "
                        f"reproduce {graph}"
                    )
        return len(golden["texts"])

    def predict(
        self, texts: Sequence[str], top_k: int = 0, batch_size: int = 32
    ) -> list[Prediction]:
        """The queue of each text: its original label id and probability (and the top k)."""
        if top_k < 0:
            raise InputError("top_k must be 0 or more")
        probabilities, distances = self.score(texts, batch_size)
        k = min(top_k, len(self.labels))
        results = []
        for row, distance in zip(probabilities, distances, strict=True):
            best = int(row.argmax())
            ranked = np.argsort(row)[::-1][:k] if k else []
            label = self.labels[best]
            route = self.route_of(float(row[best]), label, distance)
            results.append(
                Prediction(
                    label,
                    float(row[best]),
                    tuple((self.labels[int(j)], float(row[j])) for j in ranked),
                    route,
                    distance,
                    label if route else self.fallback_label,
                )
            )
        return results

    def score(
        self, texts: Sequence[str], batch_size: int = 32
    ) -> tuple[np.ndarray, list[float | None]]:
        """(probabilities (n, K), each text's out-of-scope score or None): what predict uses."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InputError(f"texts: expected a list of strings, found {type(texts).__name__}")
        if batch_size < 1:
            raise InputError("batch_size must be 1 or more")
        prepared = [self._prepare(i, t) for i, t in enumerate(texts)]
        if not prepared:
            return np.zeros((0, len(self.labels)), np.float32), []
        logits, features = self.classifier.scores(prepared, batch_size)
        probabilities = softmax(logits)
        if self.second is not None:
            rows = np.flatnonzero(unsure(probabilities, self.escalation[1]))
            if rows.size:
                again, again_features = self.second.scores([prepared[i] for i in rows], batch_size)
                probabilities[rows] = softmax(again)
                if features is not None and again_features is not None:
                    features[rows] = again_features
        distances = [None] * len(prepared)
        if self.scope is not None and features is not None:
            distances = (self.scope.distance(features) / self.distance_threshold).tolist()
        return probabilities, distances

    def route_of(self, probability: float, label: int, out_of_scope: float | None) -> bool | None:
        """Whether a ticket with this top probability, label and out-of-scope score is routed."""
        if not self.routes:
            return None
        return (
            self.threshold is not None
            and probability >= self.threshold
            and label != self.fallback_label
            and (out_of_scope is None or out_of_scope <= 1.0)
        )

    def _prepare(self, index: int, value: object) -> str:
        if not isinstance(value, str):
            raise InputError(f"texts[{index}]: expected a string, found {type(value).__name__}")
        value = value[: self.max_length * CHARS_PER_TOKEN_LIMIT]
        if self.normalize:
            value = text_rules.normalize(value, self.pattern)
        if not value.strip():
            raise InputError(f"texts[{index}]: expected some words, found an empty text")
        return value
