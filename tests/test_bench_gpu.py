"""bench/gpu.py's CPU-side parts: the throughput loop and the script's CPU check."""

import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_throughput_runs_a_training_step_loop_on_a_cpu():
    import gpu

    rate = gpu.throughput(gpu.tiny(), "cpu", fp16=False, steps=2, batch=4, tokens=8)
    assert rate > 0
    config = gpu.bert_base()
    assert (config.num_hidden_layers, config.hidden_size) == (12, 768)


def test_the_script_refuses_a_cpu_unless_asked():
    script = str(REPO / "bench" / "gpu.py")
    refused = subprocess.run([sys.executable, script], capture_output=True, text=True)
    if "GPU:" in refused.stdout:  # a CUDA machine runs the real benchmark: not here
        return
    assert refused.returncode == 1
    assert "no CUDA GPU here" in refused.stderr
    checked = subprocess.run([sys.executable, script, "--cpu", "--steps", "2"],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "tiny fp32 training: " in checked.stdout
    assert checked.stdout.startswith("CPU: ")
