"""Generation backends. Importing this package registers every built-in backend type by name;
engine libraries themselves are imported only when a backend is created."""

from cai.generate.backends import local_vllm, openai_api  # noqa: F401  (register "vllm", "openai")
from cai.generate.backends.base import Backend, BackendSpec, BackendStartError, ChatRequest, Completion, create

__all__ = ["Backend", "BackendSpec", "BackendStartError", "ChatRequest", "Completion", "create"]
