"""The commands on a shipped model: inspect, evaluate, predict, serve (no training stack)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gata_ft.errors import ConfigError, GataError
from gata_ft.failure import guard as _failure_guard

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the server runs in a container
_PATH = click.Path(path_type=Path)


@click.command()
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
            "promotion": metadata.get("promotion"),
        }
        click.echo(json.dumps(summary, indent=2))


_GRAPH = click.Choice(["serve", "int8", "int8-vnni", "fp32"])
_NO_ESCALATE = click.option(
    "--no-escalate",
    is_flag=True,
    default=None,
    help="Serve the int8 graph alone: no fp32 run for the tickets it is unsure of. "
    "[env GATA_ESCALATE=0]",
)


def _escalate(no_escalate: bool | None) -> bool | None:
    """--no-escalate: False; absent: None (GATA_ESCALATE decides, default on)."""
    return False if no_escalate else None


@click.command()
@click.argument("model", type=_PATH)
@click.option("--test", "test_dir", type=_PATH, required=True,
              help="Labelled tickets (a channel folder with data.json).")  # fmt: skip
@click.option("--graph", type=_GRAPH, default="serve", show_default=True,
              help="serve: the graph the runtime serves.")  # fmt: skip
@_NO_ESCALATE
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.option("--normalize-text", is_flag=True, help="Repair texts instead of rejecting them.")
def evaluate(model, test_dir, graph, no_escalate, as_json, normalize_text) -> None:
    """Score MODEL (model.tar.gz or its folder) on labelled tickets, without PyTorch.

    Accuracy, F1, per-queue figures, the confusion matrix, calibration, and routing at
    the model's own thresholds, through the graph the runtime serves, one ticket per call.
    """
    with _failure_guard(None):
        from gata_ft import evaluation
        from gata_ft.data import read_split
        from gata_ft.reports import format_report
        from gata_ft.runtime import Model

        split = read_split(test_dir, "test", normalize=normalize_text)
        loaded = Model.load(model, graph=graph, escalate=_escalate(no_escalate))
        try:
            result = evaluation.evaluate(loaded, split)
        finally:
            loaded.close()
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        click.echo(format_report(_report_of(result)))
        for line in evaluation.describe(result):
            click.echo(line)


def _report_of(result: dict):
    from gata_ft.reports import Report

    m = result["metrics"]
    scalars = {k: v for k, v in m.items() if k not in ("per_class", "confusion_matrix")}
    matrix = m["confusion_matrix"]
    return Report(scalars, m["per_class"], matrix["matrix"], tuple(matrix["labels"]))


@click.command()
@click.argument("model", type=_PATH)
@click.option("-t", "--text", "texts", multiple=True, help="A ticket text (repeatable).")
@click.option("-i", "--input", "input_file", type=_PATH, help='JSON Lines of {"text": ...}.')
@click.option("-k", "--top-k", default=0, show_default=True, help="Also list the k best labels.")
@click.option("--graph", type=_GRAPH, default="serve", show_default=True,
              help="serve: the graph metadata.json names.")  # fmt: skip
@click.option("--threads", default=0, show_default=True, help="onnxruntime threads (0: all cores).")
@click.option("--batch-size", default=32, show_default=True, help="Texts per onnxruntime call.")
@click.option("--verify-golden", is_flag=True, help="Replay golden.json first; fail on a mismatch.")
@_NO_ESCALATE
def predict(
    model, texts, input_file, top_k, graph, threads, batch_size, verify_golden, no_escalate
) -> None:
    """Classify tickets with MODEL (model.tar.gz or its folder): one JSON line per text."""
    with _failure_guard(None):
        from gata_ft.runtime import Model

        texts = list(texts)
        if input_file is not None:
            texts += _read_texts(input_file)
        if not texts:
            raise ConfigError("predict: expected tickets from --text or --input, found neither")
        loaded = Model.load(
            model, graph=graph, threads=threads, verify_golden=verify_golden,
            escalate=_escalate(no_escalate),
        )  # fmt: skip
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


@click.command()
@click.argument("model", type=_PATH, required=False)
@click.option("--host", default=ALL_INTERFACES, show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port to listen on. [env SAGEMAKER_BIND_TO_PORT, default 8080]",
)
@click.option("--graph", type=_GRAPH, default="serve", show_default=True,
              help="serve: the graph metadata.json names.")  # fmt: skip
@click.option("--threads", default=0, show_default=True, help="onnxruntime threads (0: all cores).")
@click.option("--no-verify-files", is_flag=True, help="Skip the sha256 check of the model's files.")
@_NO_ESCALATE
def serve(model, host, port, graph, threads, no_verify_files, no_escalate) -> None:
    """Serve MODEL over HTTP: GET /ping, POST /invocations (SageMaker's inference contract).

    MODEL defaults to $SM_MODEL_DIR (/opt/ml/model), where SageMaker extracts model.tar.gz.
    The golden samples are replayed before the server accepts requests. SAGEMAKER_*
    variables set the body limit, the timeout and the number of worker processes.
    """
    loaded = None
    with _failure_guard(None):
        from gata_ft.failure import Terminated
        from gata_ft.runtime import Model
        from gata_ft.sagemaker import model_dir
        from gata_ft.server import Settings, check_port, port_from_env, serve_workers
        from gata_ft.server import serve as run_server

        settings = Settings.from_env()
        port = port or port_from_env()
        check_port(host, port)
        # the server owns its process: its sessions share onnxruntime's one pool
        loaded = Model.load(
            model or model_dir(), graph=graph, threads=threads, verify_files=not no_verify_files,
            escalate=_escalate(no_escalate), shared_threads=settings.workers == 1,
        )  # fmt: skip
        if (loaded.folder / "golden.json").is_file():
            checked = loaded.verify_golden()
            click.echo(f"golden samples reproduced: {checked}", err=True)
        try:
            if settings.workers > 1:
                loaded.release_session()  # each worker loads its own; the folder stays
                serve_workers(
                    str(loaded.folder), graph, host, port, settings, threads,
                    _escalate(no_escalate),
                )  # fmt: skip
            else:
                run_server(loaded, host, port, settings)
        except Terminated:  # uvicorn re-raises the SIGTERM it shut down on: a normal stop
            click.echo("stopped on SIGTERM", err=True)
        finally:
            loaded.close()  # the extracted tarball, if any
