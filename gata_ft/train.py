"""The Trainer set-up and the run: validated splits -> fine-tuned model and its test logits."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from gata_ft.callbacks import CheckpointMarker, GracefulStop, install_log_callbacks
from gata_ft.config import TrainConfig
from gata_ft.data import LabelMap, Prepared, Split
from gata_ft.errors import JobInterrupted, ModelError
from gata_ft.modeling import BaseModel
from gata_ft.reports import trainer_metrics
from gata_ft.sagemaker import is_main_process, world_size

log = logging.getLogger("gata_ft")


@dataclass(frozen=True)
class Trained:
    """The fine-tuned model (best checkpoint loaded) and how the run went."""

    model: object
    tokenizer: object
    training: dict  # the metadata block, less the run time
    epoch: float
    train_loss: float


def run(
    config: TrainConfig,
    checkpoint_dir: Path,
    data: Prepared,
    base: BaseModel,
    fingerprint: str,
    resume_from: Path | None,
    emit: Callable[[str], None] = print,
    callbacks: Sequence[TrainerCallback] = (),
) -> Trained | None:
    """Fine-tune on the train split, evaluating on the test split; None on non-zero ranks."""
    cuda = torch.cuda.is_available()
    precision = config.precision(cuda)
    label_map = data.label_map

    log.info("base model %s from %s (%s)", base.name, base.path, base.source)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    set_seed(config.seed)  # the new head's initial weights come from the global RNG
    model = load_model(base, label_map)

    train_ds = tokenize(data.train, label_map, tokenizer, config.max_length)
    test_ds = tokenize(data.test, label_map, tokenizer, config.max_length)
    stop = GracefulStop()
    trainer_class, extra = Trainer, {}
    if config.class_weighting:
        trainer_class = WeightedTrainer
        extra = {"class_weights": class_weights(data.train, label_map)}
    trainer = trainer_class(
        **extra,
        model=model,
        args=training_args(config, checkpoint_dir, cuda, precision),
        train_dataset=train_ds,
        eval_dataset=test_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None),
        compute_metrics=trainer_metrics(len(label_map)),
        callbacks=[CheckpointMarker(fingerprint), stop, *callbacks],
    )
    install_log_callbacks(trainer, emit)
    if config.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(config.early_stopping_patience))

    resumed_step = None
    if resume_from is not None:
        resumed_step = int(resume_from.name.split("-")[1])
        log.info("resuming from %s (step %d)", resume_from, resumed_step)
    with warnings.catch_warnings():
        # Checkpoint rotation falls back to step order when mtimes tie: what we want.
        warnings.filterwarnings("ignore", message="mtime may not be reliable")
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop.received:
        raise JobInterrupted(
            f"received SIGTERM at step {trainer.state.global_step}: saved a checkpoint in "
            f"{checkpoint_dir}; a restarted job resumes from it"
        )

    # The best checkpoint is loaded now (load_best_model_at_end); the other ranks are done.
    if not is_main_process():
        return None
    training = {
        "device": "cuda" if cuda else "cpu",
        "precision": precision,
        "num_processes": world_size(),
        "global_step": trainer.state.global_step,
        "epochs": float(trainer.state.epoch or 0),
        "train_loss": float(output.training_loss),
        "best_checkpoint_step": _step_of(trainer.state.best_model_checkpoint),
        "resumed_from_step": resumed_step,
    }
    return Trained(
        model=trainer.model,
        tokenizer=tokenizer,
        training=training,
        epoch=trainer.state.epoch,
        train_loss=output.training_loss,
    )


def class_weights(split: Split, label_map: LabelMap) -> torch.Tensor:
    """Inverse label frequency, mean 1: a queue with 100x fewer tickets weighs 100x more."""
    counts = split.counts()
    n, k = len(split), len(label_map)
    weights = [n / (k * counts[label]) for label in label_map.labels]
    return torch.tensor(weights, dtype=torch.float32)


class WeightedTrainer(Trainer):
    """Class-weighted cross-entropy in training; evaluation losses stay unweighted."""

    def __init__(self, *args, class_weights: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights
        # The loss below is a per-batch mean: the Trainer must divide it by the
        # gradient-accumulation steps, as it does for models without loss kwargs.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(
            outputs.logits,
            labels,
            weight=self.class_weights.to(outputs.logits.device),
            label_smoothing=self.args.label_smoothing_factor,
        )
        return (loss, outputs) if return_outputs else loss


def fold_temperature(model, temperature: float, num_labels: int) -> None:
    """Divide the output layer by the temperature: logits / T without any code that knows it."""
    if temperature == 1.0:
        return
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    last = next(m for m in reversed(head) if m.out_features == num_labels)
    with torch.no_grad():
        last.weight.div_(temperature)
        if last.bias is not None:
            last.bias.div_(temperature)


def save_checkpoint(model, tokenizer, folder: Path) -> None:
    """The Hugging Face checkpoint at the artifact's root: safetensors weights, fast tokenizer."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_model(base: BaseModel, label_map: LabelMap):
    from transformers.utils import logging as hf_logging

    # The "newly initialized: classifier.weight" warning is expected for a
    # base model; say it once in our own words instead.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base.path,
            num_labels=len(label_map),
            id2label=label_map.id2label,
            label2id=label_map.label2id,
            ignore_mismatched_sizes=True,
        )
    except Exception as e:  # safetensors, torch and transformers each raise their own kinds
        raise ModelError(
            f"base model {base.name} ({base.path}) cannot be loaded: {type(e).__name__}: {e}"
        ) from e
    finally:
        hf_logging.set_verbosity(previous)
    log.info("new classification head with %d labels on %s", len(label_map), base.name)
    return model


def tokenize(split: Split, label_map: LabelMap, tokenizer, max_length: int):
    from datasets import Dataset

    # Tokenized once, unpadded; the collator pads each batch to its longest
    # ticket and the length-grouped sampler keeps those lengths similar.
    encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
    return Dataset.from_dict({**encoded, "labels": label_map.class_ids(split.labels)})


# Options that TrainingArguments takes under the same name.
PASSED_THROUGH = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "num_train_epochs",
    "learning_rate",
    "weight_decay",
    "warmup_ratio",
    "lr_scheduler_type",
    "label_smoothing_factor",
    "seed",
    "save_total_limit",
    "metric_for_best_model",
    "logging_steps",
)


def training_args(config: TrainConfig, checkpoint_dir: Path, cuda: bool, precision: str):
    per_epoch = config.eval_steps == 0
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        **{name: getattr(config, name) for name in PASSED_THROUGH},
        data_seed=config.seed,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        eval_strategy="epoch" if per_epoch else "steps",
        save_strategy="epoch" if per_epoch else "steps",
        eval_steps=None if per_epoch else config.eval_steps,
        save_steps=None if per_epoch else config.eval_steps,
        load_best_model_at_end=True,
        greater_is_better=config.metric_for_best_model != "loss",
        group_by_length=True,
        report_to="none",
        disable_tqdm=True,  # progress is ours: a bar on a terminal, plain lines elsewhere
        dataloader_pin_memory=cuda,
        ddp_backend="gloo" if world_size() > 1 and not cuda else None,
        ddp_find_unused_parameters=False,
        use_cpu=not cuda,
    )


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None
