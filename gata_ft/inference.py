"""An exported sequence-classification graph and its tokenizer: onnxruntime and tokenizers only.

Shared by the export stage (parity, golden samples) and the runtime; it must
not import torch, transformers or optimum.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FEATURES = "features"  # the graphs' second output: the classifier's input (BERT: the pooler)

# Escalation runs a second graph for the tickets the first is unsure of. Two sessions
# with a thread pool each contend: a pool's workers keep spinning after its run and
# take the cores the other session needs, so with escalation both stop spinning at
# the end of each run. Measured, BANKING77 MiniLM, VNNI int8 then fp32 for 2.4% of
# tickets, 2 cores, Intel Xeon (AMX), 1,400 tickets one at a time, p50 / escalated
# tickets' p50, two runs each: int8 alone 1.09-1.11 ms; both stopping 1.17-1.23 /
# 4.85-5.27 ms; the int8 pool as if alone and an fp32 pool that never spins
# 1.10-1.15 / 7.10-7.60 ms; one pool for both (onnxruntime's global pool)
# 1.11-1.18 / 4.76-4.90 ms. But once the global pool exists onnxruntime refuses every
# session of the process that has its own pool: only a process that owns all its
# sessions (the server) asks for it (shared_pool).
STOP_SPINNING = {"session.force_spinning_stop": "1"}

# onnxruntime 1.32's SkipLayerNormalization kernel (the residual add and layer norm
# fused) is several times slower on a CPU than the Add and LayerNormalization it
# replaces: 1 x 14 x 384, one thread, 28.2 us against 8.2 us a call (5.5 us of each is
# the call itself). The export keeps them apart (onnx.optimize) and every session is
# told not to fuse them again. BANKING77 MiniLM exported both ways, batch 1, Intel Xeon
# (AMX), 2 threads: the VNNI graph 0.93-0.96 -> 0.82-0.83 ms, the portable one
# 1.23-1.28 -> 1.13-1.14 ms; the fp32 graph, which onnxruntime leaves unfused anyway,
# 1.93 -> 1.97 ms (noise). A graph exported fused before keeps its fused nodes.
UNFUSED = ["SkipLayerNormFusion"]  # onnxruntime's names of the fusions it must not apply
_pool: dict[str, int] = {}  # {"threads": n} once this module made onnxruntime's global pool


def shared_pool(threads: int) -> bool:
    """Make this process's one onnxruntime thread pool (`threads`, 0: one per core).

    True when sessions can use it: made now, or before (its size stays the
    first one's). False when this onnxruntime offers no global pool.
    """
    if not _pool:
        try:
            from onnxruntime.capi import _pybind_state

            _pybind_state.set_global_thread_pool_sizes(threads, 1)
        except AttributeError:  # an onnxruntime without it: sessions keep their own pools
            return False
        except Exception as e:  # onnxruntime 1.32's Fail: "Global thread pools have
            if "already been created" not in str(e):  # already been created, cannot replace them"
                raise
            threads = -1  # made by another part of this process: its size is not known
        _pool["threads"] = threads
    elif threads and threads != _pool["threads"]:
        log.warning(
            "onnxruntime's shared pool has %s threads (made by the first load); "
            "threads=%d is not applied",
            _pool["threads"] if _pool["threads"] > 0 else "its own number of", threads,
        )  # fmt: skip
    return True


def session(graph: Path | str | bytes, options=None):
    """An onnxruntime CPU session of `graph` (a path or the serialized model), unfused as
    UNFUSED says: every session of gata-ft runs the graphs the way the runtime does."""
    import onnxruntime as ort

    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(
        source, options, providers=["CPUExecutionProvider"], disabled_optimizers=UNFUSED
    )


def pool_made() -> bool:
    """Whether this process has onnxruntime's global pool (then every session must use it)."""
    return bool(_pool)


def has_vnni() -> bool:
    """Whether this CPU multiplies u8 by s8 in 32 bits (AVX512-VNNI or AVX-VNNI): no saturation."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:  # noqa: PTH123 - Linux only
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False  # not Linux: the portable graph
    return "avx512_vnni" in flags or "avx_vnni" in flags


class OnnxClassifier:
    """An exported sequence-classification graph and the tokenizer it was trained with."""

    def __init__(
        self,
        graph: Path | str,
        tokenizer_file: Path | str,
        max_length: int,
        intra_op_threads: int = 0,
        session_config: dict[str, str] | None = None,
        shared_threads: bool | None = None,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if shared_threads is None:  # once the pool exists, onnxruntime allows no other
            shared_threads = pool_made()
        options = ort.SessionOptions()
        if shared_threads:  # the process's one pool (shared_pool): its threads, not ours
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = intra_op_threads  # 0: one per core
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        self.session = session(graph, options)
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = {o.name for o in self.session.get_outputs()}
        # graphs exported before gata-ft 0.2 have logits only
        self.output_names = ["logits", FEATURES] if FEATURES in outputs else ["logits"]
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self._pad_id = _pad_id(self.tokenizer)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids for a batch, padded to its longest text: exactly the graph's inputs."""
        # encode_batch hands even one text to its worker threads. Right after a model
        # run, BANKING77 MiniLM, Intel Xeon (AMX): 86 us against 65 us for encode()
        if len(texts) == 1:
            encodings = [self.tokenizer.encode(texts[0])]
        else:
            encodings = self.tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        columns = {  # each input's rows and what pads them
            "input_ids": ([e.ids for e in encodings], self._pad_id),
            "attention_mask": ([e.attention_mask for e in encodings], 0),
            "token_type_ids": ([e.type_ids for e in encodings], 0),
        }
        return {name: _padded(*columns[name], width) for name in self.input_names}

    def logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Raw scores, one row per text, in the order given."""
        return self.scores(texts, batch_size)[0]

    @property
    def has_features(self) -> bool:
        return len(self.output_names) == 2

    def scores(
        self, texts: Sequence[str], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, features) one row per text, in the order given; features None if absent."""
        runs = [
            self.session.run(self.output_names, self.encode(texts[start : start + batch_size]))
            for start in range(0, len(texts), batch_size)
        ]
        features = _joined([r[-1] for r in runs]) if self.has_features else None
        return _joined([r[0] for r in runs]), features


def _padded(rows: list[list[int]], fill: int, width: int) -> np.ndarray:
    return np.array([row + [fill] * (width - len(row)) for row in rows], dtype=np.int64)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The batches' outputs as one float32 array (one batch, the most common: as it came)."""
    whole = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return whole.astype(np.float32, copy=False)


def _pad_id(tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0
