"""Lowering, each path checked against PyTorch: torch.compile, and ONNX (dynamo exporter) with
ONNX Runtime's graph optimisation. The CUDA paths are taken automatically when present."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import LoweringError, first_line
from .fuse import FusionReport
from .fuse import fuse as fuse_for_ort
from .graph import Graph
from .inputs import Inputs
from .layout import explicit_reshape_copies
from .verify import compare, in_fp64


def device() -> str:
    """'cuda' when a GPU is usable, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def providers() -> list[str]:
    """ONNX Runtime execution providers, CUDA first when both it and a GPU are present."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def disabled_fusions(providers_: list[str]) -> list[str]:
    """ONNX Runtime fusions left out for these providers. On CPU: SkipLayerNormFusion, whose
    fp32 Skip(Simplified)LayerNormalization kernels are 7.5× (LayerNorm) and 1.9× (RMSNorm)
    slower than the Add and norm they replace (8 × 128 × 768, one thread, ORT 1.32:
    benchmarks/ort_kernels.py)."""
    return [] if "CUDAExecutionProvider" in providers_ else ["SkipLayerNormFusion"]


def ort_session(
    path: str | Path,
    *,
    threads: int | None = None,
    providers_: list[str] | None = None,
    level: str = "all",
):
    """An InferenceSession on `path` with full graph optimisation (or `level`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVELS(ort)[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    chosen = providers_ or providers()
    try:
        return ort.InferenceSession(
            str(path), so, providers=chosen, disabled_optimizers=disabled_fusions(chosen)
        )
    except Exception as exc:
        raise LoweringError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from exc


def _LEVELS(ort) -> dict:
    g = ort.GraphOptimizationLevel
    return {
        "none": g.ORT_DISABLE_ALL,
        "basic": g.ORT_ENABLE_BASIC,
        "extended": g.ORT_ENABLE_EXTENDED,
        "all": g.ORT_ENABLE_ALL,
    }


def run_onnx(session, inputs: Inputs) -> list[np.ndarray]:
    """Run an ORT session on named example inputs."""
    feed = {
        i.name: t.detach().cpu().numpy()
        for i, t in zip(session.get_inputs(), inputs.tensors, strict=True)
    }
    return session.run(None, feed)


@dataclass
class OnnxResult:
    path: Path  # the ORT-optimised model
    raw_path: Path  # the exporter's model
    max_abs_diff: float
    providers: list[str]
    export_seconds: float
    optimize_seconds: float
    nodes: dict = field(default_factory=dict)  # {"raw": n, "optimized": n}
    fusions: FusionReport | None = None  # archfx's fusion stage (ir/fuse.py), when it ran
    # When max_abs_diff exceeds TOLERANCE: both fp32 runs against the graph evaluated in fp64
    reference_error: float | None = None  # PyTorch fp32 vs fp64
    onnx_error: float | None = None  # ONNX Runtime vs fp64

    @property
    def ok(self) -> bool:
        """Within TOLERANCE of PyTorch, or at least as close to the exact (fp64) answer as
        PyTorch's own fp32 run (deep models whose fp32 noise exceeds the tolerance)."""
        if self.max_abs_diff <= TOLERANCE:
            return True
        return self.onnx_error is not None and self.onnx_error <= max(
            TOLERANCE, self.reference_error
        )


TOLERANCE = 1e-4


def to_onnx(
    graph: Graph,
    path: str | Path,
    *,
    optimize: bool = True,
    fuse: bool = True,
    opset: int | None = None,
) -> OnnxResult:
    """Export `graph` with the dynamo exporter at its dynamic shapes, rewrite it into ONNX
    Runtime's fused operators (`fuse`, ir/fuse.py: each group checked against PyTorch), optimise
    it with ONNX Runtime (saved to `path`; the exporter's model beside it as `*.raw.onnx`), and
    check both input sets against PyTorch. `optimize=False` saves the exporter's model alone."""
    import onnx

    path = Path(path)
    empty = [
        n for n, t in zip(graph.inputs.names, graph.inputs.tensors, strict=True) if 0 in t.shape
    ]
    if empty:
        raise LoweringError(
            f"input {empty[0]} is empty in the example: the export would fix its size at 0 "
            "(give the graph a non-empty example)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw.onnx") if optimize else path
    t0 = time.perf_counter()
    shapes = _dynamic_shapes(graph)
    gm = graph.gm
    if any(n.target is torch.ops.aten.reshape.default for n in gm.graph.nodes):
        gm = copy.deepcopy(gm)  # the exported copy gets explicit layouts; `graph` is untouched
        if explicit_reshape_copies(gm.graph):
            gm.recompile()
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
            _quiet(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                gm,
                tuple(graph.inputs.tensors),
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=list(graph.inputs.names),
                output_names=list(graph.output_names),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
            program.save(str(raw))
    except Exception as exc:
        raise LoweringError(
            f"ONNX export failed: {first_line(exc)}; try canonicalize first, or report the op it names"
        ) from exc
    export_s = time.perf_counter() - t0
    sets = [ins for ins in (graph.inputs, graph.second_inputs()) if ins is not None]
    expected = [graph.run(ins) for ins in sets]

    def against_pytorch(session) -> tuple[float, list]:
        """Max |Δ| of ONNX Runtime's outputs from PyTorch's on every input set, and those outputs."""
        diff, actuals = 0.0, []
        for ins, want in zip(sets, expected, strict=True):
            got = [torch.from_numpy(np.asarray(a)) for a in run_onnx(session, ins)]
            try:
                diffs = compare(want, got, graph.output_names)
            except Exception as exc:
                raise LoweringError(
                    f"ONNX Runtime's outputs do not match PyTorch's: {exc}"
                ) from exc
            diff = max(diff, *diffs.values())
            actuals.append(got)
        return diff, actuals

    t1 = time.perf_counter()
    report = None
    if optimize and fuse:
        fused = path.with_suffix(".fused.onnx")
        report = fuse_for_ort(
            raw,
            fused,
            providers=providers(),
            check=lambda p: against_pytorch(ort_session(p, level="basic"))[0],
            tolerance=TOLERANCE,
        )
    if optimize:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        )  # portable across providers
        so.optimized_model_filepath = str(path)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(
                str(fused if report is not None else raw),
                so,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=disabled_fusions(providers()),
            )
        except Exception as exc:
            raise LoweringError(
                f"ONNX Runtime cannot optimise the exported model: {first_line(exc)}"
            ) from exc
    optimize_s = time.perf_counter() - t1
    session = ort_session(path)
    diff, actuals = against_pytorch(session)
    runs = list(zip(sets, expected, actuals, strict=True))
    reference_error = onnx_error = None
    if diff > TOLERANCE:
        reference_error, onnx_error = _against_fp64(graph, runs)
    nodes = {"raw": len(onnx.load(str(raw), load_external_data=False).graph.node)}
    if optimize:
        final = onnx.load(str(path), load_external_data=False).graph.node
        nodes["optimized"] = len(final)
        if report is not None:
            report.runtime_ops = dict(
                Counter(n.op_type for n in final if n.domain == "com.microsoft")
            )
    return OnnxResult(
        path,
        raw,
        diff,
        list(session.get_providers()),
        export_s,
        optimize_s,
        nodes,
        report,
        reference_error,
        onnx_error,
    )


def _against_fp64(graph: Graph, runs) -> tuple[float, float]:
    """Max |Δ| of PyTorch's and of ONNX Runtime's fp32 outputs from the graph run in fp64."""
    gm = in_fp64(graph.gm)
    ref = onnx = 0.0
    with torch.no_grad():
        for ins, expected, actual in runs:
            exact = gm(*[t.double() if t.is_floating_point() else t for t in ins.tensors])
            for e, a, x in zip(expected, actual, exact, strict=True):
                if x.is_floating_point():
                    ref = max(ref, float((e.double() - x).abs().max()))
                    onnx = max(onnx, float((a.double() - x).abs().max()))
    return ref, onnx


def _dynamic_shapes(graph: Graph):
    """Dim.AUTO wherever the captured graph is symbolic."""
    specs = []
    for node in graph.placeholders:
        val = node.meta["val"]
        specs.append(
            {
                i: torch.export.Dim.AUTO
                for i, d in enumerate(val.shape)
                if isinstance(d, torch.SymInt)
            }
        )
    return tuple(specs)


@contextlib.contextmanager
def _quiet():
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


@dataclass
class CompileResult:
    compiled: object  # the torch.compile'd callable
    max_abs_diff: float
    seconds: float  # first call (compilation included)


def compile_graph(
    graph: Graph, *, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None
) -> CompileResult:
    """torch.compile the graph and check it against eager on both input sets."""
    try:
        compiled = torch.compile(graph.gm, backend=backend, mode=mode, dynamic=dynamic)
        t0 = time.perf_counter()
        diff = 0.0
        for ins in [graph.inputs, graph.second_inputs()]:
            if ins is None:
                continue
            with torch.no_grad():
                got = compiled(*ins.tensors)
            diff = max(diff, *compare(graph.run(ins), tuple(got), graph.output_names).values())
            if ins is graph.inputs:
                seconds = time.perf_counter() - t0
    except LoweringError:
        raise
    except Exception as exc:
        raise LoweringError(f"torch.compile failed: {first_line(exc)}") from exc
    return CompileResult(compiled, diff, seconds)
