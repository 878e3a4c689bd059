"""archfx.passes: the rewrites and what runs them, in four layers —

- `infra`: the pass contract and registry, the pipeline, its instruments;
- `engines`: what several passes share (the residual-scheme engine, the growth engine and its
  head axes, attention as memory ops, the decode form);
- `rewrites`: the passes, one per file, each registered by name;
- `io`: models in and out (model specs, the built-in zoo, artifacts, Hugging Face export,
  optimizer growth, generation and its ONNX Runtime configuration, memory inspection);

and `cli`, the `archfx` command."""

from .infra.base import REGISTRY, Option, Pass, PassResult, Remark, get, register
from .infra.pipeline import PassRecord, Pipeline, PipelineResult
from .rewrites import (  # noqa: F401  (registers the passes)
    add_heads,
    add_layers,
    altup,
    canonicalize,
    ddl,
    expand_head_dim,
    expand_hidden,
    expand_mlp,
    expand_qk,
    hc,
    mhc,
    resi_dual,
    sdnc,
)

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
