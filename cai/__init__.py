"""cai: constitutions in, critique-revision SFT data and AI-feedback preferences out."""

import importlib

# The Python entry points the README named before the packages became layers (`cai.pipeline.run(
# cai.config.load(...))`) keep working; they load on first use, so `import cai` stays cheap.
_MOVED = {"pipeline": "cai.generate.pipeline", "config": "cai.generate.config"}


def __getattr__(name: str):
    if name in _MOVED:
        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'cai' has no attribute {name!r}")
