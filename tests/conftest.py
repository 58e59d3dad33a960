from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from locations import ROOT

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# vLLM sets up its log handler once per process, on the first engine, with the stream that names then. As
# sys.stdout, inside a test that reads capsys, that would be the test's stream, closed after it, and each later
# vLLM warning would print "--- Logging error ---" on the stderr of whichever test runs then (seen when xdist
# ran another file's tests first). sys.__stdout__ is never swapped or closed; pytest still captures its fd.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.__stdout__")

# A suite started in the background of a script (`make test &` there) has SIGINT ignored, and so would the
# `cai` processes the Ctrl-C tests interrupt: they would run on. A handled signal is back to the default at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def corpus() -> list[str]:
    texts = [(ROOT / "constitutions" / "harmless.yaml").read_text()]
    for path in (ROOT / "prompts").glob("*.jsonl"):
        texts.extend(path.read_text().splitlines())
    return texts


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), corpus())


@pytest.fixture(scope="session")
def tiny_api_server(tiny_model, tmp_path_factory):
    """The real vLLM OpenAI server on the tiny model, one for the whole session (each start costs tens
    of seconds); tests of the API backend and of juries share it."""
    from api_server import running

    with running(tiny_model, tmp_path_factory.mktemp("tiny-server") / "vllm-server.log") as srv:
        yield srv


@pytest.fixture(scope="session")
def cai_home(tmp_path_factory) -> Path:
    """Where embedded models are prepared: the user's $CAI_HOME when set (a model prepared once is
    reused across test sessions), else a folder of this session."""
    home = Path(os.environ.get("CAI_HOME") or tmp_path_factory.mktemp("cai-home"))
    os.environ["CAI_HOME"] = str(home)
    return home


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (its mixed precision among it) and refuses a second
    Accelerator that differs: a test that sets its own (TRL's trainers, a bf16 run) starts and leaves
    without one, so the tests around it build theirs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
