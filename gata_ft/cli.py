"""The `gata-ft` command: the one place that prints results, writes the failure file, or exits."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from gata_ft import __version__
from gata_ft.commands import evaluate, inspect, predict, serve
from gata_ft.config import OPTIONS, build_config, option_kind, shown_default
from gata_ft.errors import GataError
from gata_ft.export.recipe import DEFAULT_RECIPE
from gata_ft.failure import guard as _failure_guard
from gata_ft.sagemaker import job_paths, read_hyperparameters


def _emit(text: str) -> None:
    click.echo(text)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("gata_ft")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gata-ft")
def cli() -> None:
    """Fine-tune a BERT ticket router and export it for CPU serving.

    On SageMaker the container runs `gata-ft train`; every path then comes from
    the SM_* variables and every option from hyperparameters.json.
    """
    _setup_logging()


def _training_options(func):
    """One flag per TrainConfig field; unset flags leave the hyperparameter or default."""
    for name in reversed(list(OPTIONS)):
        field = OPTIONS[name]
        flag = name.replace("_", "-")
        help_text = f"{field.metadata['help']} [default: {shown_default(name)}]"
        if option_kind(name) is bool:
            option = click.option(f"--{flag}/--no-{flag}", name, default=None, help=help_text)
        else:
            metavar = {int: "INT", float: "NUMBER", str: "TEXT"}[option_kind(name)]
            option = click.option(f"--{flag}", name, metavar=metavar, help=help_text)
        func = option(func)
    return func


_PATH = click.Path(path_type=Path)


@cli.command()
@click.option("--train", "train_dir", type=_PATH, help="Training channel. [env SM_CHANNEL_TRAIN]")
@click.option("--test", "test_dir", type=_PATH, help="Test channel. [env SM_CHANNEL_TEST]")
@click.option(
    "--calibration",
    "calibration_dir",
    type=_PATH,
    help="Labelled recent traffic to calibrate on. [env SM_CHANNEL_CALIBRATION; optional]",
)
@click.option(
    "--baseline",
    "baseline",
    type=_PATH,
    help="The model.tar.gz in service, to compare with. [env SM_CHANNEL_BASELINE; optional]",
)
@click.option("--model-dir", type=_PATH, help="Where model.tar.gz goes. [env SM_MODEL_DIR]")
@click.option("--output-data-dir", type=_PATH, help="Metrics and plots. [env SM_OUTPUT_DATA_DIR]")
@click.option(
    "--checkpoint-dir",
    type=_PATH,
    help="Checkpoints for resuming. [env GATA_CHECKPOINT_DIR, default /opt/ml/checkpoints]",
)
@click.option(
    "--failure-file", type=_PATH, help="Reason for a failure. [default $SM_OUTPUT_DIR/failure]"
)
@click.option(
    "--hyperparameters",
    "hyperparameters_file",
    type=_PATH,
    help="JSON object of options. [default $SM_INPUT_CONFIG_DIR/hyperparameters.json]",
)
@_training_options
def train(
    train_dir, test_dir, calibration_dir, baseline, model_dir, output_data_dir, checkpoint_dir,
    failure_file, hyperparameters_file, **flags,
) -> None:  # fmt: skip
    """Fine-tune on the train channel, evaluate on the test channel, write model.tar.gz.

    Options come from defaults, then hyperparameters.json, then these flags.
    """
    paths = job_paths(
        train=train_dir,
        test=test_dir,
        calibration=calibration_dir,
        baseline=baseline,
        model_dir=model_dir,
        output_data_dir=output_data_dir,
        checkpoint_dir=checkpoint_dir,
        failure_file=failure_file,
        hyperparameters_file=hyperparameters_file,
    )
    paths.failure_file.unlink(missing_ok=True)  # a stale reason from an earlier run
    with _failure_guard(paths.failure_file):
        from gata_ft.pipeline import training_job

        hyperparameters = read_hyperparameters(
            paths.hyperparameters_file, required=hyperparameters_file is not None
        )
        config, user_set, warnings = build_config(
            hyperparameters, flags, str(paths.hyperparameters_file)
        )
        for warning in warnings:
            logging.getLogger("gata_ft").warning(warning)
        training_job(config, user_set, paths, _emit)


@cli.command(hidden=True)
@click.argument("spec", type=_PATH)
def worker(spec: Path) -> None:
    """One process of a distributed run (started by `train` through torchrun)."""
    from gata_ft.pipeline import run_worker
    from gata_ft.sagemaker import is_main_process

    spec_data = json.loads(spec.read_text(encoding="utf-8"))
    failure = Path(spec_data["paths"]["failure_file"])
    with _failure_guard(failure if is_main_process() else None):
        run_worker(spec, _emit if is_main_process() else lambda _text: None)


@cli.command()
@click.argument("dirs", nargs=-1, type=_PATH)
@click.option("--normalize-text", is_flag=True, help="Count texts that would be repaired.")
def validate(dirs: tuple[Path, ...], normalize_text: bool) -> None:
    """Validate channel directories (each with data.json) without training.

    With no DIRS, the SageMaker train and test channels. With two or more, the
    first is the training split and the others must use only its labels.
    """
    from gata_ft.data import LabelMap, balance_table, read_split

    if not dirs:
        paths = job_paths()
        dirs = (paths.train, paths.test)
    splits, errors = [], []
    for directory in dirs:
        try:
            splits.append(read_split(directory, directory.name, normalize=normalize_text))
        except GataError as e:
            errors.append(str(e))
    if not errors and len(splits) >= 2:
        try:
            label_map = LabelMap.from_split(splits[0])
            for split in splits[1:]:
                label_map.check_covers(split)
        except GataError as e:
            errors.append(str(e))
    for split in splits:
        repaired = f", {split.normalized_rows} texts normalised" if normalize_text else ""
        click.echo(f"ok: {split.path}: {len(split)} rows, {len(split.counts())} labels{repaired}")
    if errors:
        raise click.ClickException("\n".join(errors))
    if len(splits) >= 2:
        click.echo(balance_table(LabelMap.from_split(splits[0]), splits))


@cli.command()
@click.argument("folder", type=_PATH)
@click.option("--train-per-queue", default=80, show_default=True, help="Training rows per queue.")
@click.option("--test-per-queue", default=30, show_default=True, help="Test rows per queue.")
def example(folder: Path, train_per_queue: int, test_per_queue: int) -> None:
    """Write the built-in synthetic ticket set to FOLDER/train and FOLDER/test."""
    from gata_ft.examples import QUEUES, write_example

    with _failure_guard(None):
        write_example(folder, train_per_queue, test_per_queue)
    click.echo(
        f"wrote {folder / 'train' / 'data.json'} ({train_per_queue * len(QUEUES)} rows) and "
        f"{folder / 'test' / 'data.json'} ({test_per_queue * len(QUEUES)} rows), "
        f"{len(QUEUES)} queues"
    )


@cli.command("export")
@click.argument("source", type=_PATH)
@click.option("-o", "--output", type=_PATH, required=True, help="The new model.tar.gz.")
@click.option(
    "--test", "test_dir", type=_PATH, help="Test channel (data.json): run the parity gate."
)
@click.option(
    "--recipe", default=DEFAULT_RECIPE, show_default=True, help="Export recipe name or .json path."
)
@click.option("--strict-parity", is_flag=True, help="Fail when no int8 graph passes the gate.")
@click.option(
    "--max-length",
    type=click.IntRange(8, 8192),
    help="Tokens per text. [default: from the input, else 512]",
)
@click.option("--normalize-text", is_flag=True, help="Repair test texts instead of rejecting them.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def export_command(
    source, output, test_dir, recipe, strict_parity, max_length, normalize_text, force
) -> None:
    """Write a PyTorch + ONNX (fp32, int8) model.tar.gz from SOURCE.

    SOURCE: a Hugging Face checkpoint folder, a gata-ft model.tar.gz, or a
    tarball of the old gata-finetune job. It is only read. Without --test the
    metadata records that parity was not checked.
    """
    with _failure_guard(None):
        from gata_ft.pipeline import export_job

        export_job(
            source,
            output,
            recipe,
            test_dir,
            strict_parity,
            max_length,
            normalize_text,
            force,
            _emit,
        )


for _command in (inspect, evaluate, predict, serve):
    cli.add_command(_command)


def main() -> None:
    cli()
