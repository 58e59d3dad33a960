"""The set-up leaves out PyPI's torchvision/torchaudio/torchcodec, which break transformers beside the CPU torch."""

import importlib.util


def test_transformers_imports_beside_torch():
    from transformers import LlamaConfig, LlamaForCausalLM  # fails with 'torchvision::nms does not exist' if present

    assert LlamaConfig(num_hidden_layers=1).num_hidden_layers == 1
    assert LlamaForCausalLM is not None


def test_incompatible_torch_companions_absent():
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed; scripts/setup.sh must remove it"


def test_engine_importable():
    import vllm

    assert vllm.LLM is not None
