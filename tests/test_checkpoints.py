import json
import struct
import zipfile

from gata_ft import checkpoints


def make_checkpoint(folder, step, fingerprint="fp", marker=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    for name in ("optimizer.pt", "scheduler.pt"):
        with zipfile.ZipFile(path / name, "w") as archive:
            archive.writestr("data.pkl", b"x" * 100)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marker:
        checkpoints.write_marker(path, fingerprint, step)
    return path


def test_newest_complete_checkpoint_is_chosen(tmp_path):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    warnings = []
    assert checkpoints.select_resume(tmp_path, "fp", warnings.append) == newest
    assert warnings == []


def test_no_checkpoints(tmp_path):
    assert checkpoints.select_resume(tmp_path / "none", "fp", print) is None


def test_unusable_newer_checkpoints_are_moved_aside_not_deleted(tmp_path):
    good = make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, marker=False)  # stopped mid-save
    truncated = make_checkpoint(tmp_path, 30)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-3])
    broken_zip = make_checkpoint(tmp_path, 40)
    (broken_zip / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    make_checkpoint(tmp_path, 50, fingerprint="other data")

    warnings = []
    assert checkpoints.select_resume(tmp_path, "fp", warnings.append) == good
    reasons = [w.split(": ", 1)[1] for w in warnings]
    assert reasons[0].startswith(
        "incompatible: written by a job with other data, labels or hyperparameters;"
    )
    assert reasons[1].startswith("corrupt optimizer.pt: File is not a zip file;")
    assert reasons[2].startswith("corrupt model.safetensors: 74 bytes, expected 77 (truncated?);")
    assert reasons[3].startswith(
        "incomplete: no gata-checkpoint.json, so the job stopped while writing it;"
    )
    skipped = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "skipped").iterdir())
    assert skipped == ["checkpoint-20", "checkpoint-30", "checkpoint-40", "checkpoint-50"]
    assert [p.name for p in checkpoints.checkpoints_newest_first(tmp_path)] == ["checkpoint-10"]


def test_corrupt_trainer_state(tmp_path):
    path = make_checkpoint(tmp_path, 5)
    (path / "trainer_state.json").write_text("{")
    assert checkpoints.problem(path, "fp").startswith("corrupt trainer_state.json:")


def test_fingerprint_is_order_independent():
    assert checkpoints.fingerprint({"a": 1, "b": [2]}) == checkpoints.fingerprint(
        {"b": [2], "a": 1}
    )
    assert checkpoints.fingerprint({"a": 1}) != checkpoints.fingerprint({"a": 2})
