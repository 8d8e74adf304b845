"""Routing on traffic with out-of-scope tickets: BANKING77 with held-out intents (BANKING77-OOS).

Run: make bench-routing (about 25 minutes on 2 cores: two trainings of the
packaged MiniLM). The protocol follows Zhang et al. 2021 ("Are pretrained
transformers robust in intent classification?"): of BANKING77's 77 intents, a
seeded 60 are in scope; of the 17 held out, 5 give 8 training rows each to a
fallback label, and every held-out intent's test tickets carry the fallback
label. The test traffic is cut in two halves by intent, seeded: one is the
calibration channel (labelled recent traffic), the other the reported test set.

Two jobs, `gata-ft train` as on SageMaker: "split" (a 10% calibration split of
the training rows, no channel) and "channel" (the calibration channel). Then,
through the shipped int8 graph one ticket per call, for targets 0.95 and 0.97:
- max-softmax: the threshold the job chose before out-of-scope routing (the
  lowest probability threshold whose Clopper-Pearson bound meets the target
  on the held rows; fallback predictions routed too);
- the new routing, chosen on the held rows by `calibration.choose_thresholds`,
  the job's own code: without a channel at the default assumption (no traffic
  out of scope) and at the benchmark's true share; with the channel;
- the oracle: the best coverage any thresholds for the same scores reach on
  the reported test set itself (point estimate of accuracy).
Also the AUROC of each out-of-scope score on the test set. The CPU model and
flags are printed first. --data2 runs the same protocol on another data set in
the training-data format whose out-of-scope tickets already carry --fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from machine import describe

from gata_ft.sagemaker import local_env

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "banking77"
FALLBACK = 399999999999
HYPERPARAMETERS = {
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "num_train_epochs": "5",
    "learning_rate": "0.0001",
    "per_device_train_batch_size": "32",
    "per_device_eval_batch_size": "128",
    "max_length": "64",
    "logging_steps": "100",
}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def write(folder: Path, data: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "data.json").open("w") as f:
        for row in data:
            f.write(json.dumps({"label": row["label"], "text": row["text"]}) + "\n")


def build_banking77(source: Path, out: Path, seed: int) -> None:
    rng = random.Random(seed)
    intents = list(range(77))
    rng.shuffle(intents)
    in_scope, held_out = set(intents[:60]), intents[60:]
    known = held_out[:5]

    def queue(intent: int) -> int:  # sparse Zendesk-like group ids
        return 360000100000 + 7919 * intent

    train = [
        {"label": queue(r["label"]), "text": r["text"]}
        for r in rows(source / "train" / "data.json")
        if r["label"] in in_scope
    ]
    for intent in known:
        pool = [r for r in rows(source / "train" / "data.json") if r["label"] == intent]
        rng.shuffle(pool)
        train += [{"label": FALLBACK, "text": r["text"]} for r in pool[:8]]
    traffic = [
        {"label": queue(r["label"]) if r["label"] in in_scope else FALLBACK,
         "text": r["text"], "group": r["label"]}
        for r in rows(source / "test" / "data.json")
    ]  # fmt: skip
    split_traffic(train, traffic, out, rng)


def build_other(source: Path, out: Path, seed: int, fallback: int) -> None:
    """A data set already in our format: its test traffic is split by label, seeded."""
    rng = random.Random(seed)
    train = rows(source / "train" / "data.json")
    traffic = [{**r, "group": r["label"]} for r in rows(source / "test" / "data.json")]
    global FALLBACK
    FALLBACK = fallback
    split_traffic(train, traffic, out, rng)


def split_traffic(train: list[dict], traffic: list[dict], out: Path, rng: random.Random) -> None:
    rng.shuffle(traffic)
    groups: dict[int, list[dict]] = {}
    for row in traffic:
        groups.setdefault(row["group"], []).append(row)
    channel, test = [], []
    for group in sorted(groups):
        half = len(groups[group]) // 2
        channel += groups[group][:half]
        test += groups[group][half:]
    write(out / "train", train)
    write(out / "calibration", channel)
    write(out / "test", test)


def run_job(data: Path, work: Path, channel: bool, extra: dict) -> Path:
    artifact = work / "model" / "model.tar.gz"
    if artifact.is_file():
        print(f"reusing {artifact} (delete {work} to retrain)", file=sys.stderr)
        return artifact
    (work / "config").mkdir(parents=True, exist_ok=True)
    hyper = {**HYPERPARAMETERS, "fallback_label": str(FALLBACK), **extra}
    (work / "config" / "hyperparameters.json").write_text(json.dumps(hyper))
    env = {**os.environ, **local_env(work, data / "train", data / "test")}
    if channel:
        env["SM_CHANNEL_CALIBRATION"] = str(data / "calibration")
    with (work / "train.log").open("w") as log:
        code = subprocess.call([sys.executable, "-m", "gata_ft", "train"], env=env, stdout=log)
    if code != 0:
        sys.exit(f"training failed (exit {code}); see {work / 'train.log'}")
    return artifact


def scores(model, texts: list[str]):
    """Calibrated probabilities, features' distances and raw logits, one ticket per call."""
    import numpy as np

    from gata_ft.metrics import softmax

    logits, features = [], []
    for text in texts:
        one, feature = model.classifier.scores([model._prepare(0, text)], batch_size=1)
        logits.append(one[0])
        features.append(feature[0])
    logits, features = np.array(logits), np.array(features)
    return softmax(logits.astype(float)), features, logits


def oracle(probabilities, labels, distances, fallback_class, target: float) -> float:
    """The best coverage any (probability, distance) thresholds reach on these rows."""
    import numpy as np

    from gata_ft.metrics import coverage_curve

    best = 0.0
    cuts = (
        [None] if distances is None else np.unique(np.quantile(distances, np.linspace(0, 1, 101)))
    )
    for tau in cuts:
        eligible = probabilities.argmax(-1) != fallback_class
        if tau is not None:
            eligible &= distances <= tau
        curve = coverage_curve(probabilities, labels, eligible)
        meets = np.flatnonzero(curve.accuracy >= target)
        if meets.size:
            best = max(best, float(curve.coverage[meets.max()]))
    return best


def analyse(name: str, data: Path, artifact: Path, channel: bool, held_texts, held_labels):
    import numpy as np
    from scipy.special import logsumexp

    from gata_ft import calibration as cal
    from gata_ft import metrics
    from gata_ft.archive import safe_extract
    from gata_ft.runtime import Model

    folder = artifact.parent / "extracted"
    if not folder.is_dir():
        safe_extract(artifact, folder)
    model = Model.load(folder)
    meta = model.metadata["calibration"]
    index = {label: i for i, label in enumerate(model.labels)}
    fallback = index[FALLBACK]
    test = rows(data / "test" / "data.json")
    y = np.array([index[r["label"]] for r in test])
    p, features, logits = scores(model, [r["text"] for r in test])
    d = model.scope.distance(features)
    hy = np.array([index[label] for label in held_labels])
    hp, hf, _ = scores(model, held_texts)
    hd = model.scope.distance(hf)
    inside = hy != fallback
    outside = y == fallback
    share = float(outside.mean())
    top = p.max(-1)
    aurocs = {
        "max-softmax": metrics.auroc(top[~outside], top[outside]),
        "max-logit": metrics.auroc(logits.max(-1)[~outside], logits.max(-1)[outside]),
        "energy": metrics.auroc(logsumexp(logits, -1)[~outside], logsumexp(logits, -1)[outside]),
        "Mahalanobis distance": metrics.auroc(-d[~outside], -d[outside]),
    }
    print(f"\n== {name}: {len(test)} test tickets, {outside.sum()} out of scope "
          f"({100 * share:.1f}%); held rows: {len(hy)} ({meta['source']})")  # fmt: skip
    print("AUROC on the test set: " + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()))
    t = meta["test"]
    print(f"job: temperature {meta['temperature']:.3f}, test ECE {t['ece_before']:.4f} -> "
          f"{t['ece_after']:.4f}, NLL {t['nll_before']:.4f} -> {t['nll_after']:.4f}; "
          f"threshold {meta['threshold']}, distance {meta['scope']['distance_threshold']}, "
          f"meets_target {meta['meets_target']}")  # fmt: skip
    correct = p.argmax(-1) == y
    print(
        f"{'target':>6} {'policy':<46}{'coverage':>9}{'accuracy':>10}{'oracle':>8}{'of oracle':>10}"
    )
    results = []
    for target in (0.95, 0.97):
        msp = cal.choose_thresholds(hp, hy, target)
        policies = [("max-softmax (before)", msp, False, None)]
        if channel:
            policies.append(("confident + in scope, calibration channel", cal.choose_thresholds(
                hp, hy, target, distances=hd, fallback_class=fallback, min_rejection=0.01,
                confidence=cal.CHANNEL_CONFIDENCE),
                True, None))  # fmt: skip
        else:
            for assumed in (0.0, round(share, 2)):
                choice = cal.choose_thresholds(
                    hp, hy, target, distances=hd, fallback_class=fallback, min_rejection=0.01,
                    out_of_scope_share=assumed,
                )  # fmt: skip
                policies.append((f"confident + in scope, assuming {assumed:.0%} out", choice,
                                 True, None))  # fmt: skip
        best_msp = oracle(p, y, None, -1, target)
        best = oracle(p, y, d, fallback, target)
        for label, choice, scoped, _ in policies:
            if choice.threshold is None:
                routed = np.zeros(len(y), bool)
            elif scoped:
                rule = cal.RoutingRule(choice.threshold, choice.distance_threshold, fallback)
                routed = rule.route(p, d)
            else:
                routed = top >= choice.threshold
            coverage = routed.mean()
            accuracy = correct[routed].mean() if routed.any() else float("nan")
            reference = best if scoped else best_msp
            ratio = coverage / reference if reference else float("nan")
            print(f"{target:>6} {label:<46}{coverage:>9.3f}{accuracy:>10.4f}{reference:>8.3f}"
                  f"{ratio:>10.1%}")  # fmt: skip
            results.append({"target": target, "policy": label, "coverage": coverage,
                            "accuracy": accuracy, "oracle": reference})  # fmt: skip
            if scoped and choice.threshold is not None:
                # where the figures come from: in-scope accuracy, and out-of-scope tickets
                # passing, on the held rows (as estimated) and on the test set
                held_routed = cal.RoutingRule(choice.threshold, choice.distance_threshold,
                                              fallback).route(hp, hd)  # fmt: skip
                held_hits = (hp.argmax(-1) == hy)[held_routed & inside]
                test_hits = correct[routed & ~outside].mean()
                assumed = ("" if choice.out_of_scope_pass is None else
                           f"assumed {choice.out_of_scope_pass:.3f}, ")  # fmt: skip
                print(f"{'':>7}in-scope routed accuracy: held {held_hits.mean():.4f}, test "
                      f"{test_hits:.4f}; out-of-scope passing: {assumed}"
                      f"test {routed[outside].mean():.3f}")  # fmt: skip
    return {"aurocs": aurocs, "results": results}


def held_rows(data: Path, channel: bool):
    from gata_ft.calibration import split_for_calibration

    if channel:
        held = rows(data / "calibration" / "data.json")
    else:
        train = rows(data / "train" / "data.json")
        _, index = split_for_calibration([r["label"] for r in train], 0.1, 42)
        held = [train[i] for i in index]
    return [r["text"] for r in held], [r["label"] for r in held]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--data2", type=Path, help="another data set in our format (optional)")
    parser.add_argument("--fallback", type=int, help="--data2's fallback label")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench" / "routing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(describe())
    sets = []
    if args.data2:
        name, folder = args.data2.name, args.work / f"{args.data2.name}-seed{args.seed}"
        if not (folder / "test" / "data.json").is_file():
            build_other(args.data2, folder, args.seed, args.fallback)
        global FALLBACK
        FALLBACK = args.fallback
        sets.append((name, folder))
    else:
        folder = args.work / f"banking77-oos-seed{args.seed}"
        if not (folder / "test" / "data.json").is_file():
            build_banking77(args.data, folder, args.seed)
        sets.append(("BANKING77-OOS", folder))
    report = {"cpu": describe()}
    for name, folder in sets:
        for channel in (False, True):
            kind = "channel" if channel else "split"
            artifact = run_job(folder, folder / f"job-{kind}", channel, {})
            texts, labels = held_rows(folder, channel)
            report[f"{name} {kind}"] = analyse(
                f"{name}, {kind}", folder, artifact, channel, texts, labels
            )
    (args.work / "report.json").write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
