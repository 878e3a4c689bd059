"""archfx.passes: rewrites, the pipeline that composes them, and the CLI driver."""

from . import (  # noqa: F401  (registers the passes)
    add_heads,
    add_layers,
    altup,
    canonicalize,
    ddl,
    expand_head_dim,
    expand_hidden,
    expand_mlp,
    expand_qk,
    sdnc,
)
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
