"""The Trainer set-up: arguments, class weighting, the weighted loss, folding the temperature."""

import pytest
import torch
from conftest import write_rows
from test_config import WORKFLOW

from gata_ft.config import build_config


def test_training_arguments_follow_the_config(tmp_path):
    from gata_ft.train import training_args

    config = build_config(
        {
            **WORKFLOW,
            "eval_steps": "25",
            "metric_for_best_model": "loss",
        },
        {},
    )[0]
    args = training_args(config, tmp_path, False, "fp32")
    assert args.output_dir == str(tmp_path)
    assert args.per_device_train_batch_size == 16
    assert args.num_train_epochs == 4
    assert args.learning_rate == 0.00002
    assert args.weight_decay == 0.01
    assert args.warmup_ratio == 0.1
    assert args.gradient_accumulation_steps == 4
    assert args.gradient_checkpointing is True
    assert args.group_by_length is True  # length-grouped batches; the collator pads per batch
    assert (args.eval_strategy, args.save_strategy) == ("steps", "steps")
    assert (args.eval_steps, args.save_steps) == (25, 25)
    assert args.metric_for_best_model == "loss"
    assert args.greater_is_better is False
    assert args.load_best_model_at_end is True


def test_class_weights_are_inverse_frequency_with_mean_one(tmp_path):

    from gata_ft.data import LabelMap, read_split
    from gata_ft.train import class_weights

    write_rows(tmp_path / "t", [{"label": 5, "text": "a"}] * 90 + [{"label": 9, "text": "b"}] * 10)
    split = read_split(tmp_path / "t", "train")
    weights = class_weights(split, LabelMap.from_split(split)).tolist()
    assert weights == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert (90 * weights[0] + 10 * weights[1]) / 100 == pytest.approx(1.0)  # mean 1 per ticket


def test_weighted_trainer_weights_training_loss_only(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from gata_ft.train import WeightedTrainer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    weights = torch.tensor([0.5, 1.0, 4.0])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = WeightedTrainer(model=model, args=args, class_weights=weights)
    assert trainer.model_accepts_loss_kwargs is False  # the Trainer scales it for accumulation
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 90, (6, 7)), "labels": torch.tensor([0, 1, 2, 2, 1, 0])}
    model.eval()  # no dropout, but compute_loss looks at .training: flip only the flag
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        model.training = True
        weighted = trainer.compute_loss(model, dict(batch))
        model.training = False
        plain = trainer.compute_loss(model, dict(batch))
    per_ticket = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    w = weights[batch["labels"]]
    torch.testing.assert_close(weighted, (w * per_ticket).sum() / w.sum())
    torch.testing.assert_close(plain, per_ticket.mean())
    assert not torch.isclose(weighted, plain)


def test_folding_the_temperature_divides_the_logits():
    from transformers import BertConfig, BertForSequenceClassification

    from gata_ft.train import fold_temperature

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    ).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        raw = model(input_ids=ids).logits
        fold_temperature(model, 2.5, 3)
        folded = model(input_ids=ids).logits
    torch.testing.assert_close(folded, raw / 2.5)
