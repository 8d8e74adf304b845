"""Train the packaged MiniLM on BANKING77 with `gata-ft train` and report test accuracy
beside the published figures. Run: make bench-banking77 (about 15 minutes on 2 cores).

The data is read from ../shared/data/banking77 (or --data); it is never copied
into the repository. The job runs as on SageMaker: SM_* variables, a
hyperparameters.json with string values, and the `gata-ft train` entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gata_ft.sagemaker import local_env

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "banking77"
HYPERPARAMETERS = REPO / "bench" / "banking77-hyperparameters.json"
PUBLISHED = {  # test accuracy, from the data set's README
    "BERT-large fine-tuned": 0.9366,
    "bert-base-uncased fine-tuned": 0.931,
    "DistilBERT": 0.925,
}


def train(data: Path, work: Path) -> float:
    """Run the job unless work/ already holds its artifact; return wall seconds."""
    artifact = work / "model" / "model.tar.gz"
    if artifact.is_file():
        print(f"reusing {artifact} (delete {work} to retrain)", file=sys.stderr)
        return float("nan")
    config = work / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(HYPERPARAMETERS.read_text())
    env = {**os.environ, **local_env(work, data / "train", data / "test")}
    (work / "model").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (work / "train.log").open("w") as log:
        code = subprocess.call([sys.executable, "-m", "gata_ft", "train"], env=env, stdout=log)
    if code != 0:
        sys.exit(f"training failed (exit {code}); see {work / 'train.log'}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench" / "banking77")
    args = parser.parse_args()
    if not (args.data / "train" / "data.json").is_file():
        sys.exit(f"BANKING77 not found at {args.data}: pass --data")

    seconds = train(args.data, args.work)
    from gata_ft.artifact import verify_tarball

    metadata = verify_tarball(args.work / "model" / "model.tar.gz")
    test = metadata["metrics"]["test"]
    training = metadata["training"]
    hyper = {
        k: metadata["hyperparameters"]["values"][k] for k in metadata["hyperparameters"]["user_set"]
    }
    print(f"gata-ft train, {metadata['base_model']['name']} on BANKING77, {training['device']}")
    print(f"hyperparameters: {json.dumps(hyper)}")
    print(
        f"steps {training['global_step']}, epochs {training['epochs']:.0f}, "
        f"job time {'(reused run)' if seconds != seconds else f'{seconds / 60:.1f} min'}, "
        f"best checkpoint at step {training['best_checkpoint_step']}"
    )
    print(f"{'model':<42}{'accuracy':>10}")
    print(f"{'MiniLM-L6 (gata-ft, this machine)':<42}{test['accuracy']:>10.4f}")
    for name, accuracy in PUBLISHED.items():
        print(f"{name + ' (published)':<42}{accuracy:>10.4f}")
    print(f"macro F1 {test['f1_macro']:.4f}, weighted F1 {test['f1']:.4f}")


if __name__ == "__main__":
    main()
