"""archfx.passes: rewrites, the pipeline that composes them, and the CLI driver."""

from . import altup, canonicalize, ddl  # noqa: F401  (registers the passes)
from .base import REGISTRY, Option, Pass, PassResult, Remark, get, register
from .pipeline import PassRecord, Pipeline, PipelineResult

__all__ = [
    "REGISTRY",
    "Option",
    "Pass",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "Remark",
    "get",
    "register",
]
