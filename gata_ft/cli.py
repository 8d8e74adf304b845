"""The `gata-ft` command: the one place that prints results, writes the failure file, or exits."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from gata_ft import __version__
from gata_ft.config import OPTIONS, build_config, option_kind, shown_default
from gata_ft.errors import GataError, WorkerFailed
from gata_ft.export.recipe import DEFAULT_RECIPE
from gata_ft.failure import printable, reason_of, show_traceback, sigterm_raises, write_failure
from gata_ft.sagemaker import job_paths, read_hyperparameters

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the server runs in a container


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
    train_dir, test_dir, calibration_dir, model_dir, output_data_dir, checkpoint_dir, failure_file,
    hyperparameters_file, **flags,
) -> None:  # fmt: skip
    """Fine-tune on the train channel, evaluate on the test channel, write model.tar.gz.

    Options come from defaults, then hyperparameters.json, then these flags.
    """
    paths = job_paths(
        train=train_dir,
        test=test_dir,
        calibration=calibration_dir,
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


@cli.command()
@click.argument("model", type=_PATH)
def inspect(model: Path) -> None:
    """Verify a model.tar.gz (format, schema, every file's sha256) and print its summary as JSON."""
    with _failure_guard(None):
        from gata_ft.artifact import validate_metadata, verify_tarball

        metadata = verify_tarball(model)  # the format check and every file's sha256
        validate_metadata(metadata)
        test = (metadata.get("metrics") or {}).get("test") or {}
        summary = {
            "format_version": metadata["format_version"],
            "labels": [entry["label"] for entry in metadata["labels"]],
            "files": sorted(metadata["files"]),
            "serve": metadata["serve"],
            "parity_checked": metadata["parity"]["checked"],
            "parity_passed": metadata["parity"].get("passed"),
            "test_accuracy": test.get("accuracy"),
        }
        click.echo(json.dumps(summary, indent=2))


_GRAPH = click.Choice(["serve", "int8", "int8-vnni", "fp32"])


@cli.command()
@click.argument("model", type=_PATH)
@click.option("-t", "--text", "texts", multiple=True, help="A ticket text (repeatable).")
@click.option("-i", "--input", "input_file", type=_PATH, help='JSON Lines of {"text": ...}.')
@click.option("-k", "--top-k", default=0, show_default=True, help="Also list the k best labels.")
@click.option("--graph", type=_GRAPH, default="serve", show_default=True,
              help="serve: the graph metadata.json names.")  # fmt: skip
@click.option("--threads", default=0, show_default=True, help="onnxruntime threads (0: all cores).")
@click.option("--batch-size", default=32, show_default=True, help="Texts per onnxruntime call.")
@click.option("--verify-golden", is_flag=True, help="Replay golden.json first; fail on a mismatch.")
def predict(model, texts, input_file, top_k, graph, threads, batch_size, verify_golden) -> None:
    """Classify tickets with MODEL (model.tar.gz or its folder): one JSON line per text."""
    with _failure_guard(None):
        from gata_ft.runtime import Model

        texts = list(texts)
        if input_file is not None:
            texts += _read_texts(input_file)
        if not texts:
            raise click.UsageError("give --text or --input")
        loaded = Model.load(model, graph=graph, threads=threads, verify_golden=verify_golden)
        for text, prediction in zip(texts, loaded.predict(texts, top_k, batch_size), strict=True):
            click.echo(json.dumps({"text": text, **prediction.to_dict()}))


def _read_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GataError(f"{path}:{number}: malformed JSON: {e.msg} at column {e.colno}") from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise GataError(f'{path}:{number}: expected an object with a "text" string')
        texts.append(row["text"])
    return texts


@cli.command()
@click.argument("model", type=_PATH, required=False)
@click.option("--host", default=ALL_INTERFACES, show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=int, help="Port to listen on. [env SAGEMAKER_BIND_TO_PORT, default 8080]"
)
@click.option("--graph", type=_GRAPH, default="serve", show_default=True,
              help="serve: the graph metadata.json names.")  # fmt: skip
@click.option("--threads", default=0, show_default=True, help="onnxruntime threads (0: all cores).")
@click.option("--no-verify-files", is_flag=True, help="Skip the sha256 check of the model's files.")
def serve(model, host, port, graph, threads, no_verify_files) -> None:
    """Serve MODEL over HTTP: GET /ping, POST /invocations (SageMaker's inference contract).

    MODEL defaults to $SM_MODEL_DIR (/opt/ml/model), where SageMaker extracts model.tar.gz.
    The golden samples are replayed before the server accepts requests. SAGEMAKER_*
    variables set the body limit, the timeout and the number of worker processes.
    """
    loaded = None
    with _failure_guard(None):
        import os

        from gata_ft.failure import Terminated
        from gata_ft.runtime import Model
        from gata_ft.sagemaker import model_dir
        from gata_ft.server import Settings, check_port, serve_workers
        from gata_ft.server import serve as run_server

        settings = Settings.from_env()
        port = port or int(os.environ.get("SAGEMAKER_BIND_TO_PORT") or 8080)
        check_port(host, port)
        loaded = Model.load(
            model or model_dir(), graph=graph, threads=threads, verify_files=not no_verify_files
        )
        if (loaded.folder / "golden.json").is_file():
            checked = loaded.verify_golden()
            click.echo(f"golden samples reproduced: {checked}", err=True)
        try:
            if settings.workers > 1:
                serve_workers(str(loaded.folder), graph, host, port, settings)
            else:
                run_server(loaded, host, port, settings)
        except Terminated:  # uvicorn re-raises the SIGTERM it shut down on: a normal stop
            click.echo("stopped on SIGTERM", err=True)
        finally:
            loaded.close()  # the extracted tarball, if any


@contextmanager
def _failure_guard(failure_file: Path | None) -> Iterator[None]:
    """Turn any failure into one `Error: ...` line on stderr, a failure file and exit code 1."""
    try:
        with sigterm_raises():
            yield
        return
    except WorkerFailed as e:  # the worker wrote the failure file already
        reason, failure_file = str(e), None
    except (Exception, KeyboardInterrupt) as e:
        if show_traceback():
            traceback.print_exc(file=sys.stderr)
        reason = reason_of(e)
    reason = printable(reason)
    if failure_file is not None:
        problem = write_failure(failure_file, reason)
        if problem:
            click.echo(f"warning: {problem}", err=True)
    click.echo(f"Error: {reason}", err=True)
    sys.exit(1)


def main() -> None:
    cli()
