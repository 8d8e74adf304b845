"""Time per training epoch: gata-ft (dynamic padding, length-grouped batches) against the
old job (every ticket padded to 512 tokens), same data, model, batch size and machine.

A padded epoch of BANKING77 takes about an hour on 2 CPU cores, so both sides
run a fixed number of optimizer steps after a warm-up, and the epoch time is
steps per epoch x seconds per step. Run: make bench-epoch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import PrinterCallback, TrainerCallback  # after the offline switch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "banking77"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder with train/data.json"
    )
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--old-steps", type=int, default=6, help="timed steps of the padded job")
    parser.add_argument("--new-steps", type=int, default=60, help="timed steps of gata-ft")
    parser.add_argument("--warmup-steps", type=int, default=2)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from gata_ft.data import LabelMap, read_split
    from gata_ft.modeling import resolve_base_model

    split = read_split(args.data / "train", "train")
    label_map = LabelMap.from_split(split)
    base = resolve_base_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    steps_per_epoch = -(-len(split) // args.batch_size)

    results = {}
    for name, padded, steps in (
        ("old: pad to 512", True, args.old_steps),
        ("gata-ft: dynamic", False, args.new_steps),
    ):
        seconds, tokens = time_steps(
            base.path,
            tokenizer,
            split,
            label_map,
            args.batch_size,
            padded,
            steps,
            args.warmup_steps,
        )
        results[name] = {
            "seconds_per_step": seconds,
            "padded_tokens_per_step": tokens,
            "epoch_minutes": seconds * steps_per_epoch / 60,
            "timed_steps": steps,
        }
        print(f"{name}: {seconds:.3f} s/step over {steps} steps", file=sys.stderr, flush=True)

    old, new = results["old: pad to 512"], results["gata-ft: dynamic"]
    print(
        f"BANKING77 train: {len(split)} rows, batch {args.batch_size}, "
        f"{steps_per_epoch} steps per epoch"
    )
    print(
        f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"{'approach':<20}{'s/step':>10}{'tokens/batch':>14}{'epoch (min)':>14}")
    for name, r in results.items():
        print(
            f"{name:<20}{r['seconds_per_step']:>10.3f}{r['padded_tokens_per_step']:>14.0f}"
            f"{r['epoch_minutes']:>14.1f}"
        )
    print(f"speed-up per epoch: {old['epoch_minutes'] / new['epoch_minutes']:.1f}x")
    print(json.dumps({"results": results, "speedup": old["epoch_minutes"] / new["epoch_minutes"]}))


def time_steps(model_path, tokenizer, split, label_map, batch_size, padded, steps, warmup):
    """Seconds per optimizer step of a Trainer run, and padded tokens per batch.

    gata-ft's side is the job's own Trainer set-up (length-grouped sampler,
    collator that pads to the longest ticket of each batch); the old side is
    the same Trainer with every ticket padded to 512 and plain shuffled batches.
    """
    import dataclasses
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer
    from transformers.utils import logging as hf_logging

    from gata_ft.config import TrainConfig
    from gata_ft.train import tokenize, training_args

    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(per_device_train_batch_size=batch_size, seed=0)
        args = training_args(config, Path(scratch), False, "fp32")
        args = dataclasses.replace(
            args,
            max_steps=warmup + steps,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            group_by_length=not padded,
            logging_strategy="no",
        )
        if padded:
            encoded = tokenizer(split.texts, truncation=True, max_length=512, padding="max_length")
            dataset = Dataset.from_dict({**encoded, "labels": label_map.class_ids(split.labels)})
        else:
            dataset = tokenize(split, label_map, tokenizer, config.max_length)
        torch.manual_seed(0)
        hf_logging.set_verbosity_error()  # "newly initialized: classifier" is expected
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(label_map)
        )
        clock = _StepClock(warmup)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=_Counting(DataCollatorWithPadding(tokenizer), clock),
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return clock.seconds_per_step(), clock.tokens_per_batch()


class _Counting:
    """Wraps a collator to count the padded tokens of every batch."""

    def __init__(self, collator, clock):
        self.collator, self.clock = collator, clock

    def __call__(self, features):
        batch = self.collator(features)
        self.clock.tokens.append(batch["input_ids"].numel())
        return batch


class _StepClock(TrainerCallback):
    """Wall time between optimizer steps (data loading included), after a warm-up."""

    def __init__(self, warmup):
        self.warmup, self.marks, self.tokens = warmup, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def seconds_per_step(self):
        timed = self.marks[self.warmup - 1 :] if self.warmup else self.marks
        return (timed[-1] - timed[0]) / (len(timed) - 1)

    def tokens_per_batch(self):
        counted = self.tokens[self.warmup :]
        return sum(counted) / len(counted)


if __name__ == "__main__":
    main()
