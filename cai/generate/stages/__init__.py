"""Pipeline stages. Importing this package registers every built-in stage type by name."""

from cai.generate.stages import compare, critique_revise, respond, revision_check, score  # noqa: F401  (register each stage type)
from cai.generate.stages.base import Processed, Row, RowFailed, Stage, StageContext, build

__all__ = ["Processed", "Row", "RowFailed", "Stage", "StageContext", "build"]
