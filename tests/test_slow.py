"""End-to-end runs of the packaged pretrained MiniLM (minutes on 2 CPU cores)."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import BANKING77, REPO, write_hyperparameters, write_rows

from gata_ft.artifact import verify_tarball
from gata_ft.cli import cli

pytestmark = pytest.mark.slow


def test_demo_settings_train_minilm_on_the_example(tmp_path, sm_env):
    from gata_ft.examples import write_example

    data = write_example(tmp_path / "demo")
    hyper = json.loads((REPO / "examples" / "demo-hyperparameters.json").read_text())
    hyper["num_train_epochs"] = "2"
    sm_env_train = {"SM_CHANNEL_TRAIN": data / "train", "SM_CHANNEL_TEST": data / "test"}
    write_hyperparameters(sm_env, hyper)
    result = CliRunner(env={k: str(v) for k, v in sm_env_train.items()}).invoke(cli, ["train"])
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    assert metadata["base_model"] == {
        "name": "sentence-transformers/all-MiniLM-L6-v2",
        "source": "package",
    }
    # 10 queues: chance is 0.10; 3% of the tickets are routed "wrongly" on purpose
    assert metadata["metrics"]["test"]["accuracy"] > 0.85
    assert re.search(r"^test accuracy 0\.\d{4}, macro F1 ", result.stdout, re.MULTILINE)
    # both formats, and int8 close to fp32 on the 300 test tickets
    assert metadata["serve"]["graph"] == "onnx/model_quantized.onnx"
    int8 = metadata["parity"]["attempts"][-1]
    assert int8["agreement"] >= 0.98
    assert abs(int8["scores"]["accuracy"] - metadata["parity"]["pytorch_fp32"]["accuracy"]) <= 0.01


@pytest.mark.skipif(not BANKING77.is_dir(), reason=f"BANKING77 not found at {BANKING77}")
def test_minilm_on_a_banking77_subset(tmp_path, sm_env):
    """20 of the 77 intents, 40 training rows each, every test row of those intents."""
    keep = set(range(20))
    per_label = {}
    train = []
    for line in (BANKING77 / "train" / "data.json").read_text().splitlines():
        row = json.loads(line)
        if row["label"] in keep and per_label.get(row["label"], 0) < 40:
            per_label[row["label"]] = per_label.get(row["label"], 0) + 1
            train.append(row)
    test = [
        row
        for row in map(json.loads, (BANKING77 / "test" / "data.json").read_text().splitlines())
        if row["label"] in keep
    ]
    write_rows(tmp_path / "b77" / "train", train)
    write_rows(tmp_path / "b77" / "test", test)
    write_hyperparameters(
        sm_env,
        {
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "num_train_epochs": "4",
            "learning_rate": "0.0001",
            "per_device_train_batch_size": "16",
            "max_length": "64",
        },
    )
    env = {
        "SM_CHANNEL_TRAIN": str(tmp_path / "b77" / "train"),
        "SM_CHANNEL_TEST": str(tmp_path / "b77" / "test"),
    }
    result = CliRunner(env=env).invoke(cli, ["train"])
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    assert len(metadata["labels"]) == 20
    assert metadata["data"]["test"]["rows"] == len(test) == 800
    assert metadata["metrics"]["test"]["accuracy"] > 0.8


def offline_base_install(tmp_path: Path) -> Path:
    """A fresh venv with `pip install gata-ft` (no extras), from files on this machine only.

    The wheel is built here with --no-index; the dependencies pip would fetch
    are this environment's installed copies, linked in with their dist-info, so
    that `pip check` in the new venv proves the base install's requirements.
    """
    from importlib import metadata

    from packaging.requirements import Requirement

    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
         "--no-build-isolation", "--quiet", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while wanted:
        requirement = wanted.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        tops = {Path(f).parts[0] for f in dist.files or () if ".." not in Path(f).parts}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
        wanted += [Requirement(r) for r in dist.requires or ()]
    python = venv / "bin" / "python"
    wheel = next(wheels.glob("gata_ft-*.whl"))
    for step in (["install", "--no-index", "--no-deps", "--quiet", str(wheel)], ["check"]):
        done = subprocess.run([python, "-m", "pip", *step], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return venv


def test_runtime_installs_and_runs_without_the_training_stack(tmp_path, trained_artifact):
    """`pip install gata-ft` (no extras) into a fresh venv: predict works, torch is absent."""
    venv = offline_base_install(tmp_path)
    python = venv / "bin" / "python"
    code = (
        "import importlib.util, json, sys;"
        "from gata_ft.runtime import Model;"
        f"m = Model.load({str(trained_artifact['tarball'])!r}, verify_golden=True);"
        "print(m.predict(['my order has not arrived'])[0].label);"
        "print(json.dumps([importlib.util.find_spec(n) is None "
        "for n in ('torch', 'transformers', 'optimum', 'sklearn')]))"
    )
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    label, absent = run.stdout.splitlines()
    assert int(label) in {
        entry["label"] for entry in verify_tarball(trained_artifact["tarball"])["labels"]
    }
    assert json.loads(absent) == [True, True, True, True]
    cli_run = subprocess.run(
        [
            venv / "bin" / "gata-ft",
            "predict",
            str(trained_artifact["tarball"]),
            "-t",
            "refund please",
        ],
        capture_output=True,
        text=True,
    )
    assert cli_run.returncode == 0, cli_run.stderr
    assert json.loads(cli_run.stdout)["label"].isdigit()
