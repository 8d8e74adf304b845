"""The fp16 GPU path: training accuracy against the CPU figure, throughput, and the export.

On a machine with a CUDA GPU (make bench-gpu):
1. `gata-ft train` (fp16, as the job chooses on CUDA) of the packaged MiniLM on
   BANKING77 with bench/banking77-hyperparameters.json: test accuracy beside
   the CPU run's (README: 0.9325);
2. training samples per second of a bert-base-sized BERT (random weights: the
   speed does not depend on them), fp16 and fp32, batch 32, 128 tokens;
3. `gata-ft export --test` of the GPU-trained checkpoint: the CPU graphs and
   the parity gate from a model trained in fp16.
Without CUDA it says so and stops, unless --cpu (a few steps of the tiny parts,
to check the script itself; the tests run that). --base-model and --data point
elsewhere on a machine without this checkout's environment or ../shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "banking77"
WORK = REPO / "build" / "bench" / "gpu"
CPU_ACCURACY = 0.9325  # make bench-banking77 on the CPU (README)


def throughput(config, device: str, fp16: bool, steps: int, batch: int, tokens: int) -> float:
    """Training samples per second of a BertForSequenceClassification built from `config`."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device, enabled=fp16)
    ids = torch.randint(1000, config.vocab_size, (batch, tokens), device=device)
    labels = torch.randint(0, config.num_labels, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16, enabled=fp16):
            loss = model(input_ids=ids, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def bert_base(num_labels: int = 77):
    from transformers import BertConfig

    return BertConfig(num_labels=num_labels)  # 12 layers, hidden 768: bert-base's shape


def tiny(num_labels: int = 5):
    from transformers import BertConfig

    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    return BertConfig(vocab_size=2000, intermediate_size=64, num_labels=num_labels, **sizes)


def train_on_banking77(work: Path, data: Path, base_model: str | None) -> dict:
    from gata_ft.sagemaker import local_env

    job = work / "banking77"
    artifact = job / "model" / "model.tar.gz"
    if not artifact.is_file():
        (job / "config").mkdir(parents=True, exist_ok=True)
        hyper = json.loads((REPO / "bench" / "banking77-hyperparameters.json").read_text())
        if base_model:
            hyper["base_model"] = base_model
        (job / "config" / "hyperparameters.json").write_text(json.dumps(hyper))
        env = {**os.environ, **local_env(job, data / "train", data / "test")}
        started = time.monotonic()
        with (job / "train.log").open("w") as log:
            command = [sys.executable, "-m", "gata_ft", "train"]
            code = subprocess.call(command, env=env, stdout=log)
        if code:
            sys.exit(f"training failed; see {job / 'train.log'}")
        print(f"training: {(time.monotonic() - started) / 60:.1f} min")
    from gata_ft.artifact import verify_tarball

    return verify_tarball(artifact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="check the script on a CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", type=Path, default=DATA, help="BANKING77 (train/, test/)")
    parser.add_argument("--base-model", help="a MiniLM folder (default: the packaged one)")
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args()
    import torch

    print(describe())
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        sys.exit("no CUDA GPU here: run on a GPU machine, or pass --cpu to check the script")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}")  # fmt: skip
        config, batch, tokens = bert_base(), 32, 128
    else:
        config, batch, tokens = tiny(), 4, 16
    device = "cuda" if cuda else "cpu"
    for fp16 in (True, False) if cuda else (False,):
        rate = throughput(config, device, fp16, args.steps, batch, tokens)
        print(f"{'bert-base' if cuda else 'tiny'} {'fp16' if fp16 else 'fp32'} training: "
              f"{rate:.1f} samples/s (batch {batch}, {tokens} tokens)")  # fmt: skip
    if not cuda:
        return
    metadata = train_on_banking77(args.work, args.data, args.base_model)
    test, training = metadata["metrics"]["test"], metadata["training"]
    print(f"BANKING77, MiniLM, {training['precision']} on {training['device']}: accuracy "
          f"{test['accuracy']:.4f} (CPU run: {CPU_ACCURACY}), "
          f"{training['runtime_seconds']:.0f} s")  # fmt: skip
    out = args.work / "exported.tar.gz"
    trained = args.work / "banking77" / "model" / "model.tar.gz"
    command = [sys.executable, "-m", "gata_ft", "export", str(trained), "-o", str(out),
               "--test", str(args.data / "test"), "--force"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout[-3000:] or done.stderr[-3000:])


if __name__ == "__main__":
    main()
