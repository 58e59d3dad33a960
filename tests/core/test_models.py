"""The embedded SmolLM2 model: converted once from its GGUF file, atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cai.core.models import embedded_path, prepare

pytestmark = pytest.mark.slow


def test_killed_conversion_leaves_no_model(tmp_path):
    home = tmp_path / "home"
    code = "from cai.core.models import prepare; prepare('smollm2')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "CAI_HOME": str(home)}, stderr=subprocess.DEVNULL
    )
    models = home / "models"
    deadline = time.monotonic() + 300
    # Kill it while the checkpoint is being written: the moment the temporary folder has a file.
    while time.monotonic() < deadline and proc.poll() is None:
        if any(any(d.iterdir()) for d in models.glob(".smollm2.tmp-*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "conversion ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (models / "smollm2").exists()


def test_prepare_converts_once(cai_home):
    path = embedded_path("smollm2")
    converts = not path.exists()  # a $CAI_HOME of the user's may hold it already
    command = [sys.executable, "-m", "cai.cli", "models", "prepare", "smollm2"]
    done = subprocess.run(command, capture_output=True, text=True)
    # the terminal gets the checkpoint's folder alone; transformers' progress bars go to the log
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{path}\n", "")
    assert not converts or (path.parent / "prepare.log").stat().st_size > 0
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (path / "model.safetensors").stat().st_size > 400e6  # fp32 weights, not the 4-bit file
    stamp = (path / "model.safetensors").stat().st_mtime
    assert prepare("smollm2") == path and (path / "model.safetensors").stat().st_mtime == stamp


def test_checkpoint_loads_with_transformers(cai_home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
