"""The router's runtime (onnxruntime + tokenizers, no torch) and `gata-ft predict`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXED, REPO

from gata_ft import text as text_rules
from gata_ft.archive import safe_extract
from gata_ft.cli import cli
from gata_ft.errors import ArtifactError
from gata_ft.export.reference import onnx_logits
from gata_ft.inference import has_vnni, session
from gata_ft.metrics import softmax
from gata_ft.runtime import InputError, Model


@pytest.fixture(scope="module")
def model(trained_artifact):
    return Model.load(trained_artifact["tarball"])


def test_predictions_equal_the_export_stage_onnx_predictions(trained_artifact, model):
    folder = trained_artifact["dir"]

    def graph_scores(graph):
        tokenizer = folder / "tokenizer.json"
        return softmax(np.concatenate([onnx_logits(graph, tokenizer, [t], 64) for t in FIXED]))

    int8, fp32 = graph_scores(folder / model.graph), graph_scores(folder / "onnx/model.onnx")
    # what the gate measured: the int8 graph, and fp32 for the tickets it is unsure of
    graph, below = model.escalation
    assert graph == "onnx/model.onnx"
    unsure = int8.max(-1) < below
    assert unsure.any()
    assert not unsure.all()  # the tiny model is sure of some tickets and not of others
    expected = np.where(unsure[:, None], fp32, int8)
    got = [model.predict([text])[0] for text in FIXED]
    labels = [e["label"] for e in model.metadata["labels"]]
    assert [p.label for p in got] == [labels[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose([p.probability for p in got], expected.max(-1), atol=1e-6)
    # the graph metadata.json names, or its VNNI companion on a CPU with VNNI
    serve = model.metadata["serve"]
    assert model.graph == (serve["vnni"]["graph"] if has_vnni() else serve["graph"])


POOLS = """
import json, sys
from gata_ft.runtime import Model

def pools(model):
    sessions = [c.session.get_session_options() for c in (model.classifier, model.second)]

    def stopping(options):
        try:
            return options.get_session_config_entry("session.force_spinning_stop") == "1"
        except RuntimeError:  # not set: onnxruntime's default
            return False

    return [[not o.use_per_session_threads for o in sessions], [stopping(o) for o in sessions]]

folder, case = sys.argv[1], sys.argv[2]
if case == "taken":  # another part of the process made onnxruntime's pool first
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state
    _pybind_state.set_global_thread_pool_sizes(1, 1)
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    ort.InferenceSession(folder + "/onnx/model.onnx", options, providers=["CPUExecutionProvider"])
loads = [Model.load(folder, threads=2, shared_threads=case != "library"),
         Model.load(folder, threads=1)]  # a later plain load: onnxruntime allows no other pool
alone = Model.load(folder, escalate=False).classifier.session.get_session_options()
from gata_ft.inference import OnnxClassifier  # as the export stage makes its sessions
direct = OnnxClassifier(folder + "/onnx/model.onnx", folder + "/tokenizer.json", 64, 2)
own = [alone.use_per_session_threads, direct.session.get_session_options().use_per_session_threads]
print(json.dumps([pools(m) for m in loads] + [own]))
"""


def test_sessions_keep_the_residual_add_apart_from_its_layer_norm(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    width = 8
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "skip"], ["sum"]),
            helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1),
        ],
        "residual",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, width]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(width, np.float32), "gamma"),
         numpy_helper.from_array(np.zeros(width, np.float32), "beta")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def ops(make) -> set[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        make(model.SerializeToString(), options)
        return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}

    fused = ops(lambda m, o: ort.InferenceSession(m, o, providers=["CPUExecutionProvider"]))
    # onnxruntime's own choice, the slow kernel; should a later onnxruntime stop fusing,
    # this control fails first: measure the kernels again before dropping UNFUSED
    assert "SkipLayerNormalization" in fused
    assert ops(session) == {"Add", "LayerNormalization"}


@pytest.mark.parametrize("case", ["library", "server", "taken"])
def test_the_two_escalation_sessions_never_spin_against_each_other(trained_artifact, case):
    # onnxruntime's global pool is made once per process: each case in a new process
    result = subprocess.run(
        [sys.executable, "-c", POOLS, str(trained_artifact["dir"]), case],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, later, own_pools = json.loads(result.stdout)
    shared, neither_spins = [[True, True], [False, False]], [[False, False], [True, True]]
    if case == "library":  # each session its own pool, stopped after each run
        assert first == later == neither_spins
        assert own_pools == [True, True]  # one session: as onnxruntime makes it
    else:  # the server's: one pool for both, and for every later session in the process
        assert first == later == shared
        assert own_pools == [False, False]
    if case == "server":  # the second load asked for 1 thread, the pool has 2
        assert "shared pool has 2 threads (made by the first load); threads=1" in result.stderr


def test_escalation_can_be_turned_off_and_is_recorded_by_the_gate(trained_artifact,
                                                                    monkeypatch):  # fmt: skip
    folder = trained_artifact["dir"]
    on, off = Model.load(folder), Model.load(folder, escalate=False)
    assert on.escalation == ("onnx/model.onnx", 0.5)
    assert off.escalation is None
    assert off.second is None
    monkeypatch.setenv("GATA_ESCALATE", "0")
    assert Model.load(folder).escalation is None
    assert Model.load(folder, escalate=True).escalation is not None  # explicit wins
    assert Model.load(folder, graph="fp32").second is None  # fp32 served: nothing to escalate
    monkeypatch.delenv("GATA_ESCALATE")
    alone, served = off.predict(FIXED), on.predict(FIXED)
    for a, b in zip(alone, served, strict=True):
        if a.probability >= 0.5:  # sure: the int8 answer stands
            assert a == b
    assert alone != served  # the unsure ones were scored again
    serve = on.metadata["serve"]
    assert serve["escalate"] == {"graph": "onnx/model.onnx", "below": 0.5}
    attempt = on.metadata["parity"]["attempts"][-1]
    assert 0 < attempt["escalated"] < 1
    assert attempt["int8_agreement"] <= 1
    assert "are scored again by the fp32 graph (" in trained_artifact["log"]


def test_a_changed_fp32_graph_is_refused_when_escalation_needs_it(tmp_path, trained_artifact):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(trained_artifact["dir"], folder)
    graph = folder / "onnx" / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=r"onnx/model\.onnx: does not match its sha256"):
        Model.load(folder)
    assert Model.load(folder, escalate=False).second is None  # int8 alone never reads it


def test_a_model_exported_with_the_fused_layer_norm_is_served_with_a_notice(
    tmp_path, trained_artifact, caplog
):
    import shutil

    exported = json.loads((trained_artifact["dir"] / "metadata.json").read_text())
    assert exported["onnx"]["unfused"] == ["SkipLayerNormFusion"]
    with caplog.at_level("INFO", logger="gata_ft"):
        Model.load(trained_artifact["dir"])
    assert "SkipLayerNormalization" not in caplog.text
    folder = tmp_path / "model"
    shutil.copytree(trained_artifact["dir"], folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    del metadata["onnx"]["unfused"]  # as every export before it
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with caplog.at_level("INFO", logger="gata_ft"):
        model = Model.load(folder)
    assert "fused SkipLayerNormalization" in caplog.text
    assert "gata-ft export MODEL -o NEW.tar.gz --test DIR" in caplog.text
    assert model.predict(FIXED[:1])[0].label in model.labels  # it still serves
    caplog.clear()
    with caplog.at_level("INFO", logger="gata_ft"):
        Model.load(folder, graph="fp32")  # onnxruntime never fused the fp32 graph
    assert "SkipLayerNormalization" not in caplog.text
    metadata["onnx"]["unfused"] = [{"hostile": []}, 7]  # not names: a notice, no traceback
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with caplog.at_level("INFO", logger="gata_ft"):
        Model.load(folder)
    assert "fused SkipLayerNormalization" in caplog.text


def test_the_vnni_graph_is_chosen_by_the_cpu_and_can_be_overridden(trained_artifact, monkeypatch):
    import gata_ft.runtime as runtime

    folder = trained_artifact["dir"]
    monkeypatch.setattr(runtime, "has_vnni", lambda: True)
    assert Model.load(folder).graph == "onnx/model_quantized_vnni.onnx"
    monkeypatch.setattr(runtime, "has_vnni", lambda: False)
    assert Model.load(folder).graph == "onnx/model_quantized.onnx"  # portable: no saturation
    monkeypatch.setenv("GATA_GRAPH", "int8-vnni")
    assert Model.load(folder).graph == "onnx/model_quantized_vnni.onnx"
    assert Model.load(folder, graph="fp32").graph == "onnx/model.onnx"  # an explicit choice wins


def test_one_text_is_encoded_as_in_a_padded_batch(model):
    short, long = "card lost", "my card was lost abroad and the bank app shows nothing"
    alone, batch = model.classifier.encode([short]), model.classifier.encode([short, long])
    width = alone["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] > width
    assert batch["attention_mask"][0, width:].sum() == 0  # padding after the short text
    assert list(alone) == list(batch) == model.classifier.input_names
    for name, array in alone.items():
        assert array.dtype == np.int64
        assert array.shape == (1, width)
        np.testing.assert_array_equal(array[0], batch[name][0, :width])
    # a text over max_length is cut the same way alone (encode) as in a batch (encode_batch)
    overlong = "cärd lost abroad " * model.max_length
    alone, batch = model.classifier.encode([overlong]), model.classifier.encode([short, overlong])
    assert alone["input_ids"].shape == (1, model.max_length)
    for name, array in alone.items():
        np.testing.assert_array_equal(array[0], batch[name][1])


def test_predict_returns_queue_ids_and_top_k(model):
    predictions = model.predict(FIXED, top_k=3)
    assert len(predictions) == len(FIXED)
    for p in predictions:
        assert p.label in model.labels
        assert len(p.top_k) == 3
        assert p.top_k[0] == (p.label, p.probability)
        assert p.top_k[0][1] >= p.top_k[1][1] >= p.top_k[2][1]
    data = predictions[0].to_dict()
    assert set(data) == {"label", "probability", "top_k", "route", "queue", "out_of_scope"}
    assert data["label"] == str(predictions[0].label)


def test_route_follows_the_threshold_and_says_none_without_calibration(trained_artifact):
    model = Model.load(trained_artifact["dir"])
    probabilities = sorted(p.probability for p in model.predict(FIXED))
    assert probabilities[0] < probabilities[-1]
    model.routes, model.threshold = True, (probabilities[0] + probabilities[-1]) / 2
    routed = [p.route for p in model.predict(FIXED)]
    assert routed == [p.probability >= model.threshold for p in model.predict(FIXED)]
    assert set(routed) == {True, False}
    model.threshold = None  # calibrated, but no threshold met the target: route nothing
    assert {p.route for p in model.predict(FIXED)} == {False}
    model.routes = False  # no calibration in the artifact: no opinion
    assert {p.route for p in model.predict(FIXED)} == {None}
    assert "route" not in model.predict(FIXED)[0].to_dict()


def test_the_caller_can_pick_the_graph(trained_artifact):
    assert Model.load(trained_artifact["dir"], graph="fp32").graph == "onnx/model.onnx"
    assert Model.load(trained_artifact["dir"], graph="int8").graph == "onnx/model_quantized.onnx"


def test_text_is_normalised_as_in_training(model):
    raw = model.predict(["I can't LOG IN to my account!!"])[0]
    clean = model.predict(["i can t log in to my account!!"])[0]
    assert raw == clean


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ("a single string", "texts: expected a list of strings, found str"),
        (["ok", 5], "texts[1]: expected a string, found int"),
        (["ok", "   "], "texts[1]: expected some words, found an empty text"),
        (["€€€"], "texts[0]: expected some words, found an empty text"),
        ([None], "texts[0]: expected a string, found NoneType"),
    ],
)
def test_bad_input_is_a_clear_error(model, texts, message):
    with pytest.raises(InputError) as info:
        model.predict(texts)
    assert str(info.value) == message


def test_empty_list_and_huge_text_have_defined_results(model):
    assert model.predict([]) == []
    huge = "my card was declined " * 200_000  # 4 MB
    assert model.predict([huge])[0] == model.predict([huge[: 64 * 32]])[0]
    seen, normalized = [], []
    tokenize = model.classifier.encode
    model.classifier.encode = lambda texts: seen.extend(texts) or tokenize(texts)
    real_normalize = text_rules.normalize
    text_rules.normalize = lambda text, pattern: (
        normalized.append(len(text)) or real_normalize(text, pattern)
    )
    try:
        model.predict([huge])
    finally:
        model.classifier.encode, text_rules.normalize = tokenize, real_normalize
    # cut before normalising and tokenizing: the work is bounded whatever the size
    assert normalized == [64 * 32]
    assert [len(text) for text in seen] == [64 * 32]


def test_golden_samples_pass_and_a_mismatch_is_detected(tmp_path, trained_artifact):
    folder = tmp_path / "model"
    safe_extract(trained_artifact["tarball"], folder)
    assert Model.load(folder).verify_golden() > 0
    golden = json.loads((folder / "golden.json").read_text())
    golden["texts"][0] = golden["texts"][1]  # a drifted tokenizer sees other tokens
    (folder / "golden.json").write_text(json.dumps(golden))
    with pytest.raises(ArtifactError, match=r"golden.json: does not match its sha256"):
        Model.load(folder, verify_golden=True)  # the file table catches the edit first
    with pytest.raises(ArtifactError, match=r"^golden sample 0 \("):
        Model.load(folder, verify_golden=True, verify_files=False)


def test_wrong_format_version_is_refused(tmp_path, trained_artifact):
    folder = tmp_path / "model"
    safe_extract(trained_artifact["tarball"], folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["format_version"] = 1
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ArtifactError) as info:
        Model.load(folder)
    assert str(info.value) == (
        f"{folder}: expected artifact format_version 2, found 1; "
        "upgrade it with `gata-ft export MODEL -o NEW.tar.gz`"
    )


def test_runtime_imports_no_torch_transformers_or_optimum(trained_artifact):
    code = (
        "import sys; from gata_ft.runtime import Model;"
        f"m = Model.load({str(trained_artifact['tarball'])!r}, verify_golden=True);"
        "print(m.predict(['my order has not arrived'])[0].label);"
        "heavy = sorted(n for n in ('torch', 'transformers', 'optimum', 'datasets', 'sklearn')"
        " if n in sys.modules);"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == "[]"


def test_base_install_leaves_out_the_training_stack():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split("==")[0].split("[")[0] for d in project["dependencies"]}
    assert names == {"click", "jsonschema", "numpy", "onnxruntime", "tokenizers"}


def test_predict_command_prints_json_lines(tmp_path, trained_artifact):
    inputs = tmp_path / "tickets.jsonl"
    inputs.write_text('{"text": "my order has not arrived"}\n\n{"text": "refund please"}\n')
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            str(trained_artifact["tarball"]),
            "--text",
            "cannot log in",
            "--input",
            str(inputs),
            "-k",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == [
        "cannot log in",
        "my order has not arrived",
        "refund please",
    ]
    assert all(len(r["top_k"]) == 2 and r["label"].isdigit() for r in rows)


def test_predict_command_errors(tmp_path, trained_artifact):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    result = CliRunner().invoke(cli, ["predict", str(trained_artifact["tarball"]), "-i", str(bad)])
    assert result.exit_code == 1
    assert result.stderr == f'Error: {bad}:2: expected an object with a "text" string\n'
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "nope.tar.gz"), "-t", "x"])
    assert result.exit_code == 1
    assert "no such model" in result.stderr
    result = CliRunner().invoke(cli, ["predict", str(trained_artifact["tarball"])])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: predict: expected tickets from --text or --input, found neither\n"
    )


def repack(folder: Path, out: Path, skip=()) -> Path:
    import tarfile

    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            if not any(name.startswith(s) for s in skip):
                tar.add(path, arcname=name)
    return out


def predict_cli(model_path) -> object:
    return CliRunner().invoke(cli, ["predict", str(model_path), "-t", FIXED[0]])


def one_error(result, fragment: str):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("Error: ")] == [
        line for line in result.stderr.splitlines() if line.strip()
    ][:1]
    assert fragment in result.stderr


def test_an_altered_graph_is_refused_at_load(tmp_path, trained_artifact):
    import onnx
    from onnx import numpy_helper

    folder = tmp_path / "model"
    safe_extract(trained_artifact["tarball"], folder)
    for name in ("onnx/model_quantized.onnx", "onnx/model_quantized_vnni.onnx"):
        graph = onnx.load(str(folder / name))
        bias = next(t for t in graph.graph.initializer if t.name == "classifier.bias")
        values = numpy_helper.to_array(bias).copy()
        values[0] += 1.0  # the classifier's bias changed, metadata untouched
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))
        onnx.save(graph, str(folder / name))
    tarball = repack(folder, tmp_path / "altered.tar.gz")
    for path in (folder, tarball):
        one_error(predict_cli(path), "does not match its sha256 in metadata.json")
    result = CliRunner().invoke(cli, ["inspect", str(tarball)])
    assert result.exit_code == 1
    model = Model.load(folder, verify_files=False)  # the opt-out, for whoever must
    assert model.predict(FIXED[:1])


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda m: [1, 2, 3], "expected metadata.json to hold a JSON object, found list"),
        (lambda m: {k: v for k, v in m.items() if k != "serve"}, "serve.graph: expected one of"),
        (lambda m: {**m, "serve": {"graph": "../../../../etc/passwd"}},
         "serve.graph: expected one of onnx/model.onnx"),
        (lambda m: {**m, "max_length": "lots"},
         'max_length: expected a positive integer, found "lots"'),
    ],
)  # fmt: skip
def test_broken_metadata_is_one_error_naming_the_field(tmp_path, trained_artifact, change,
                                                        fragment):  # fmt: skip
    folder = tmp_path / "model"
    safe_extract(trained_artifact["tarball"], folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps(change(metadata)))
    one_error(predict_cli(folder), fragment)
    (folder / "metadata.json").write_text("{not json")
    one_error(predict_cli(folder), "metadata.json: expected JSON, found invalid JSON")


def test_a_tarball_without_onnx_is_one_error(tmp_path, trained_artifact):
    folder = tmp_path / "model"
    safe_extract(trained_artifact["tarball"], folder)
    tarball = repack(folder, tmp_path / "no-onnx.tar.gz", skip=("onnx/",))
    one_error(predict_cli(tarball), "onnx/model_quantized")


def test_extraction_caps_refuse_a_gzip_bomb_and_huge_metadata(tmp_path, monkeypatch):
    import io
    import tarfile

    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        info = tarfile.TarInfo("onnx/model.onnx")
        info.size = 64 * 2**20  # zeros compress to almost nothing
        tar.addfile(info, io.BytesIO(bytes(info.size)))
        meta = tarfile.TarInfo("metadata.json")
        meta.size = 2 * 2**20
        tar.addfile(meta, io.BytesIO(b" " * meta.size))
    monkeypatch.setenv("GATA_MAX_EXTRACT_MB", "32")
    out = tmp_path / "out"
    one_error(predict_cli(bomb), "expected at most 32 MB unpacked, found members of 66 MB; "
                                 "raise GATA_MAX_EXTRACT_MB")  # fmt: skip
    assert not out.exists()
    monkeypatch.setenv("GATA_MAX_EXTRACT_MB", "1000")
    monkeypatch.setenv("GATA_MAX_METADATA_MB", "1")
    result = CliRunner().invoke(cli, ["inspect", str(bomb)])
    one_error(result, "expected at most 1 MB of metadata, found 2 MB; raise GATA_MAX_METADATA_MB")


def test_a_tarball_made_with_tar_dot_loads_and_verifies(tmp_path, trained_artifact):
    """`tar czf model.tar.gz -C folder .` names members ./metadata.json: the same artifact."""
    folder = tmp_path / "model"
    safe_extract(trained_artifact["tarball"], folder)
    tarball = tmp_path / "dot.tar.gz"
    subprocess.run(["tar", "czf", str(tarball), "-C", str(folder), "."], check=True)
    import tarfile

    with tarfile.open(tarball) as tar:
        assert "./metadata.json" in tar.getnames()
    model = Model.load(tarball)
    try:
        assert model.predict([FIXED[0]])[0].label == Model.load(folder).predict([FIXED[0]])[0].label
    finally:
        model.close()
    shown = CliRunner().invoke(cli, ["inspect", str(tarball)])
    assert shown.exit_code == 0, shown.output  # every file's sha256 checked
    assert "metadata.json" not in json.loads(shown.stdout)["files"]
    assert "onnx/model.onnx" in json.loads(shown.stdout)["files"]


def test_reading_metadata_from_a_tarball_honours_the_member_cap(tmp_path, monkeypatch):
    import io
    import tarfile

    crowded = tmp_path / "crowded.tar.gz"
    with tarfile.open(crowded, "w:gz") as tar:
        for i in range(50):
            tar.addfile(tarfile.TarInfo(f"noise/{i}"), io.BytesIO(b""))
        meta = b"{}"
        info = tarfile.TarInfo("metadata.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    monkeypatch.setenv("GATA_MAX_MEMBERS", "20")
    result = CliRunner().invoke(cli, ["inspect", str(crowded)])
    one_error(result, "expected at most 20 members, found more; raise GATA_MAX_MEMBERS")


RELEASE = """
import json, sys
from pathlib import Path
from gata_ft.runtime import Model

def anonymous_mb():
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return next(int(line.split()[1]) // 1024 for line in rollup if line.startswith("Anonymous:"))

model = Model.load(sys.argv[1])
# 200 MB freed in 1 kB blocks, every 100th kept: no free block reaches the heap's top,
# so free() returns none of it to the system, as with a session's many small buffers
junk = [bytes(1000) for _ in range(200_000)]
kept = junk[::100]
del junk
before = anonymous_mb()
model.release_session()
print(json.dumps({"before": before, "after": anonymous_mb(), "released": model.classifier is None}))
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="Linux only")
def test_releasing_the_sessions_gives_freed_memory_back(trained_artifact):
    """The parent of several server workers keeps no dead heap (release_session trims it)."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "malloc_trim") or os.environ.get("LD_PRELOAD"):
        pytest.skip("not glibc's malloc: no malloc_trim, or another allocator preloaded")
    result = subprocess.run(
        [sys.executable, "-c", RELEASE, str(trained_artifact["dir"])],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    figures = json.loads(result.stdout)
    assert figures["released"]
    assert figures["before"] - figures["after"] > 100, figures  # of the 198 MB freed
