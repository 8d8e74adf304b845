import json
import os
import re
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BANKING77 = Path(os.environ.get("GATA_BANKING77", REPO.parent / "shared" / "data" / "banking77"))


def pytest_configure(config):
    # Caches (evaluate's module copies, datasets) go to a throw-away folder, and
    # nothing may reach for the network: tests run as the production job does.
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="gata-ft-tests-hf-")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SM_") or name == "GATA_CHECKPOINT_DIR":
            monkeypatch.delenv(name)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def write_rows(folder: Path, rows, name="data.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (2 layers, hidden 32) with a small WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from gata_ft import examples

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = set()
    for _, phrasings in examples.QUEUES.values():
        for text in phrasings:
            words.update(re.findall(r"[a-z0-9]+", text))
    for values in examples.SLOTS.values():
        for text in values:
            words.update(re.findall(r"[a-z0-9]+", text))
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "!"]
    vocab += list(chars) + [f"##{c}" for c in chars] + sorted(words - set(chars))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from gata_ft.modeling import resolve_base_model

    return resolve_base_model("sentence-transformers/all-MiniLM-L6-v2").path


@pytest.fixture
def example_data(tmp_path) -> Path:
    """The built-in example, small: 10 queues, 12 training and 4 test rows each."""
    from gata_ft.examples import write_example

    return write_example(tmp_path / "data", train_per_queue=12, test_per_queue=4)


@pytest.fixture
def sm_env(tmp_path, monkeypatch, example_data):
    """SageMaker's variables pointing at temporary folders; returns the folders."""
    dirs = {
        "SM_CHANNEL_TRAIN": example_data / "train",
        "SM_CHANNEL_TEST": example_data / "test",
        "SM_MODEL_DIR": tmp_path / "model",
        "SM_OUTPUT_DATA_DIR": tmp_path / "output" / "data",
        "SM_OUTPUT_DIR": tmp_path / "output",
        "SM_INPUT_CONFIG_DIR": tmp_path / "config",
        "GATA_CHECKPOINT_DIR": tmp_path / "checkpoints",
    }
    for name, value in dirs.items():
        monkeypatch.setenv(name, str(value))
    dirs["SM_MODEL_DIR"].mkdir()
    dirs["SM_INPUT_CONFIG_DIR"].mkdir()
    return dirs


def write_hyperparameters(sm_env, values: dict) -> Path:
    path = sm_env["SM_INPUT_CONFIG_DIR"] / "hyperparameters.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


def tiny_options(tiny_model_dir: Path) -> dict[str, str]:
    """Fast options for the tiny model, as SageMaker sends them (strings)."""
    return {
        "base_model": str(tiny_model_dir),
        "num_train_epochs": "2",
        "per_device_train_batch_size": "16",
        "learning_rate": "0.001",
        "logging_steps": "2",
        "max_length": "64",
        "calibration_split": "0",  # the step counts below use every training row
    }


@pytest.fixture
def tiny_hyperparameters(tiny_model_dir):
    return tiny_options(tiny_model_dir)


FIXED = [
    "i was charged twice for my pro subscription",
    "my order 12345 has not arrived yet",
    "please delete my account and all my personal data",
    "the api returns error 500 for every request",
    "hello i cannot log in to my account. thanks",
]


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory, tiny_model_dir):
    """The training job's tarball for the tiny model, made once for the whole session."""
    from click.testing import CliRunner

    from gata_ft.archive import safe_extract
    from gata_ft.cli import cli
    from gata_ft.examples import write_example
    from gata_ft.sagemaker import local_env

    root = tmp_path_factory.mktemp("export")
    data = write_example(root / "data", train_per_queue=40, test_per_queue=4)
    (root / "config").mkdir()
    (root / "config" / "hyperparameters.json").write_text(
        json.dumps(
            {
                "base_model": str(tiny_model_dir),
                "num_train_epochs": "8",
                "learning_rate": "0.005",
                "max_length": "64",
            }
        )
    )
    env = local_env(root, data / "train", data / "test")
    result = CliRunner(env=env).invoke(cli, ["train"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    extracted = root / "extracted"
    safe_extract(root / "model" / "model.tar.gz", extracted)
    return {
        "tarball": root / "model" / "model.tar.gz",
        "dir": extracted,
        "data": data,
        "log": result.stdout,
    }


@pytest.fixture
def content(tmp_path):
    folder = tmp_path / "content"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"fp32")
    (folder / "onnx" / "model_quantized.onnx").write_bytes(b"int8")
    return folder
