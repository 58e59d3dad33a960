"""Generation backends. Importing this package registers every built-in backend type by name;
engine libraries themselves are imported only when a backend is created."""

from cai.generate.backends import local_vllm, openai_api, openai_batch  # noqa: F401  (register "vllm", "openai", "openai_batch")
from cai.generate.backends.base import Backend, BackendSpec, BackendStartError, ChatRequest, Completion, create

__all__ = ["Backend", "BackendSpec", "BackendStartError", "ChatRequest", "Completion", "create"]
