"""Training options: one dataclass, filled from defaults, hyperparameters.json and CLI flags."""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from gata_ft.errors import ConfigError
from gata_ft.export.recipe import DEFAULT_RECIPE, Recipe

METRICS = (
    "f1",
    "accuracy",
    "precision",
    "recall",
    "f1_macro",
    "precision_macro",
    "recall_macro",
    "loss",
)
MAX_SEED = 2**32 - 1
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


def _opt(default, help: str, shown: str | None = None):
    return field(default=default, metadata={"help": help, "shown": shown})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of the training job. Each one is a hyperparameter and a CLI flag."""

    base_model: str = _opt(
        "bert-base-uncased",
        "Hugging Face model id (looked up in the local cache) or a local checkpoint directory.",
    )
    allow_download: bool = _opt(
        False, "Let the job download the base model from the Hugging Face Hub when not cached."
    )
    max_length: int = _opt(256, "Truncate tickets to this many tokens.")
    per_device_train_batch_size: int = _opt(16, "Training batch size per GPU (or CPU).")
    per_device_eval_batch_size: int = _opt(64, "Evaluation batch size per GPU (or CPU).")
    gradient_accumulation_steps: int = _opt(1, "Batches to accumulate before each optimizer step.")
    gradient_checkpointing: bool = _opt(
        False, "Recompute activations in the backward pass: less memory, slower."
    )
    num_train_epochs: float = _opt(4.0, "Passes over the training data.")
    learning_rate: float = _opt(2e-5, "Peak learning rate of AdamW.")
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    warmup_ratio: float = _opt(0.1, "Share of the steps spent warming the learning rate up.")
    lr_scheduler_type: str = _opt("linear", f"Learning-rate schedule: {', '.join(SCHEDULERS)}.")
    label_smoothing_factor: float = _opt(0.0, "Label smoothing of the cross-entropy loss.")
    seed: int = _opt(42, "Random seed (model head, data order, dropout).")
    fp16: bool | None = _opt(None, "fp16 mixed precision; by default on when CUDA is available.")
    bf16: bool = _opt(False, "bf16 mixed precision instead of fp16 (Ampere GPUs and newer).")
    metric_for_best_model: str = _opt(
        "f1", f"Metric that picks the best checkpoint: {', '.join(METRICS)}."
    )
    early_stopping_patience: int = _opt(
        0, "Stop after this many evaluations without improvement (0: never stop early)."
    )
    eval_steps: int = _opt(
        0, "Evaluate and checkpoint every N optimizer steps (0: at the end of each epoch)."
    )
    logging_steps: int = _opt(50, "Log the training loss every N optimizer steps.")
    save_total_limit: int = _opt(2, "Checkpoints to keep (the best one is always kept).")
    normalize_text: bool = _opt(
        False, "Repair texts (lower-case, other characters to spaces) instead of rejecting them."
    )
    calibration_split: float = _opt(
        0.1,
        "Share of each label's training rows held out to fit the temperature and the "
        "routing threshold (0: no calibration).",
    )
    target_accuracy: float = _opt(
        0.95, "Accuracy the routed tickets must reach at the recommended threshold."
    )
    fallback_label: int | None = _opt(
        None,
        "Label of the fallback queue (tickets no queue owns); it must occur in the training "
        "data. Trained as a queue, never routed to: its tickets and those not routed go there.",
        shown="none",
    )
    expected_out_of_scope: float = _opt(
        0.0,
        "Share of traffic expected to belong to no queue; the thresholds keep the target "
        "under it when no calibration channel is given.",
    )
    out_of_scope_rejection: float = _opt(
        0.01,
        "Least share of in-scope held-out tickets the in-scope (distance) threshold rejects.",
    )
    require_improvement: bool = _opt(
        False,
        "Fail the job when the new model is significantly worse than the baseline (the model "
        "in service).",
    )
    strict_routing: bool = _opt(
        False,
        "Fail the job when the routed accuracy on the test set is below target_accuracy "
        "beyond its confidence interval.",
    )
    class_weighting: bool = _opt(
        True, "Weight the loss by inverse label frequency, so that small queues are learnt."
    )
    export_recipe: str = _opt(
        DEFAULT_RECIPE,
        "Export recipe: a name in export/ (avx2, avx512_vnni, arm64) or a .json path.",
    )
    strict_parity: bool = _opt(
        False, "Fail the job when no int8 graph passes the parity gate (else serve fp32)."
    )

    def __post_init__(self) -> None:
        checks = [
            ("base_model", bool(self.base_model.strip()), "a model id or a directory"),
            ("max_length", 8 <= self.max_length <= 8192, "an integer from 8 to 8192"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "at least 1"),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size >= 1, "at least 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "at least 1"),
            ("num_train_epochs", self.num_train_epochs > 0, "a number above 0"),
            ("learning_rate", 0 < self.learning_rate < 1, "a number between 0 and 1"),
            ("weight_decay", self.weight_decay >= 0, "a number of 0 or more"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "a number from 0 up to 1"),
            ("label_smoothing_factor", 0 <= self.label_smoothing_factor < 1, "from 0 up to 1"),
            ("lr_scheduler_type", self.lr_scheduler_type in SCHEDULERS, f"one of {SCHEDULERS}"),
            # numpy seeds its generator with 32 bits: a larger seed fails in set_seed
            ("seed", 0 <= self.seed <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"),
            ("metric_for_best_model", self.metric_for_best_model in METRICS, f"one of {METRICS}"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "0 or more"),
            ("eval_steps", self.eval_steps >= 0, "0 or more"),
            ("logging_steps", self.logging_steps >= 1, "at least 1"),
            ("save_total_limit", self.save_total_limit >= 1, "at least 1"),
            ("calibration_split", 0 <= self.calibration_split <= 0.5, "a number from 0 to 0.5"),
            ("target_accuracy", 0 < self.target_accuracy <= 1, "a number above 0, at most 1"),
            ("fallback_label", (self.fallback_label or 0) >= 0, "a label id, 0 or more"),
            (
                "expected_out_of_scope",
                0 <= self.expected_out_of_scope <= 0.9,
                "a number from 0 to 0.9",
            ),
            (
                "out_of_scope_rejection",
                0 <= self.out_of_scope_rejection <= 0.5,
                "a number from 0 to 0.5",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, found {getattr(self, name)!r}")
        try:  # parsed and checked now, not after the GPU hours are spent
            Recipe.load(self.export_recipe)
        except ConfigError as e:
            raise ConfigError(f"export_recipe: {e}") from None
        if self.fp16 and self.bf16:
            raise ConfigError("fp16 and bf16 are both true: choose one mixed precision")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def precision(self, cuda: bool) -> str:
        """fp16 on CUDA unless the user chose otherwise; fp32 on a CPU; bf16 on request."""
        fp16 = self.fp16 if self.fp16 is not None else (cuda and not self.bf16)
        if fp16 and not cuda:
            raise ConfigError(
                "fp16: expected a CUDA GPU for fp16 mixed precision, found none; "
                "leave fp16 unset (automatic) or use bf16"
            )
        return "fp16" if fp16 else "bf16" if self.bf16 else "fp32"


_TYPES = typing.get_type_hints(TrainConfig)
OPTIONS = {f.name: f for f in fields(TrainConfig)}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"", "none", "null"}


def shown_default(name: str) -> str:
    """How help texts and the README show an option's default."""
    field_ = OPTIONS[name]
    if field_.metadata["shown"]:
        return field_.metadata["shown"]
    default = field_.default
    if default is None:
        return "auto"
    return str(default).lower() if isinstance(default, bool) else str(default)


def option_kind(name: str) -> type:
    """The scalar type of an option: bool, int, float or str."""
    kind = _TYPES[name]
    return next(t for t in (bool, int, float, str) if t is kind or t in typing.get_args(kind))


def parse_value(name: str, raw: object, source: str) -> object:
    """Convert one option value, as SageMaker sends it (a string) or as JSON, to its type."""
    kind = option_kind(name)
    value = raw
    if isinstance(value, str):
        value = value.strip()
        if OPTIONS[name].default is None and kind is not bool and value.lower() in _NONE:
            return None
        # The SageMaker Python SDK's framework estimators JSON-encode every
        # value, so a string arrives wrapped in a second pair of quotes.
        if len(value) >= 2 and value[0] == value[-1] == '"':
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
    try:
        return _convert(kind, value)
    except ValueError:
        expected = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
        }[kind]
        raise ConfigError(f"{name}: expected {expected}, found {raw!r} (in {source})") from None


def _convert(kind: type, value: object) -> object:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError
    if isinstance(value, bool):
        raise ValueError
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ValueError
    if kind is float:
        number = float(value) if isinstance(value, int | float | str) else math.nan
        if not math.isfinite(number):
            raise ValueError
        return number
    if not isinstance(value, str):
        raise ValueError
    return value


def build_config(
    hyperparameters: Mapping[str, object],
    flags: Mapping[str, object],
    hyperparameters_source: str = "hyperparameters.json",
    env: Mapping[str, str] | None = None,
) -> tuple[TrainConfig, list[str], list[str]]:
    """Merge defaults < GATA_BASE_MODEL (an image's baked model) < hyperparameters < CLI flags.

    Returns the config, the names the user set, and warnings about unknown keys.
    """
    env = os.environ if env is None else env
    defaults = {"base_model": env["GATA_BASE_MODEL"]} if env.get("GATA_BASE_MODEL") else {}
    values: dict[str, object] = {}
    warnings = []
    for key, raw in hyperparameters.items():
        if key in OPTIONS:
            values[key] = parse_value(key, raw, hyperparameters_source)
        elif not key.startswith("sagemaker_"):  # the SDK's own keys, not ours
            close = difflib.get_close_matches(key, list(OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            warnings.append(
                f"unknown hyperparameter {key!r} in {hyperparameters_source} is ignored{hint}"
            )
    for key, raw in flags.items():
        if raw is not None:
            values[key] = parse_value(key, raw, "command line")
    return TrainConfig(**{**defaults, **values}), sorted(values), warnings
