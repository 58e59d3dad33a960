import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to gain from threads, and on a shared CPU OpenMP threads
    spinning against another process's make each step tens of times slower. Restored afterwards: the
    rest of the suite keeps torch's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target_tokens(tiny_model) -> list[str]:
    """PPO's rule reward in tests: about 30% of the vocabulary, so the untrained model's answers hold
    that share, with enough spread between answers for a reward signal."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [tokenizer.decode([i]) for i in range(300, 600)]
    return [t for t in texts if len(tokenizer.encode(t, add_special_tokens=False)) == 1]


@pytest.fixture(scope="session")
def judge_api_server(tiny_model, tmp_path_factory):
    """The real vLLM OpenAI server on the tiny model made a judge (synthetic.judge_model), one for the
    whole session: the online trainers' judge tests share it."""
    from api_server import running
    from synthetic import judge_model

    folder = tmp_path_factory.mktemp("judge-server")
    with running(judge_model(tiny_model, folder / "judge"), folder / "vllm-server.log") as srv:
        yield srv
