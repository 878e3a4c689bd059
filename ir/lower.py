"""Lowering, each path checked against PyTorch: torch.compile, and ONNX (dynamo exporter) with
ONNX Runtime's graph optimisation. The CUDA paths are taken automatically when present."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import math
import re
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx

from .errors import LoweringError, OnnxMismatchError, first_line
from .fuse import FusionReport, exact_no_ops
from .fuse import fuse as fuse_for_ort
from .graph import Graph
from .inputs import Inputs
from .layout import explicit_reshape_copies
from .memory import DELTA
from .ops import aten, is_assert, is_call, is_dropout_identity
from .sinkhorn import SINKHORN, explicit_sinkhorn
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
    spinning: bool = True,
):
    """An InferenceSession on `path` with full graph optimisation (or `level`). `spinning=False`:
    its worker threads sleep between runs instead of spinning (for sessions that take turns
    on the same cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVELS(ort)[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
class OutputCheck:
    """One output's figures, the largest over the input sets. Errors are relative: divided by
    `scale`, the output's max |value| in PyTorch's fp64 run."""

    name: str
    scale: float
    max_abs_diff: float  # ONNX Runtime vs PyTorch, both fp32, absolute
    onnx_error: float  # ONNX Runtime (the final model, fp32) vs PyTorch fp64
    reference_error: float  # PyTorch fp32 vs PyTorch fp64
    fp64_error: float | None = None  # the export run in fp64 by ONNX Runtime vs PyTorch fp64
    fp64_limit: float | None = None  # FP64_TOLERANCE, or MIXED_TOLERANCE with fp32 islands

    @property
    def failure(self) -> str | None:
        """Why this output fails the check, one line; None when it passes."""
        if self.fp64_error is not None and not self.fp64_error <= self.fp64_limit:
            return (
                f"output {self.name}: the export run in fp64 is {self.fp64_error:.2e} (relative) "
                f"from PyTorch's fp64 run, beyond {self.fp64_limit:.0e}: the exported model "
                f"computes a different function"
            )
        if not self.onnx_error <= FP32_LIMIT:
            return (
                f"output {self.name}: ONNX Runtime's fp32 run is {self.onnx_error:.2e} (relative; "
                f"max |Δ| {self.onnx_error * self.scale:.3g} at scale {self.scale:.3g}) from "
                f"PyTorch's fp64 run, beyond {FP32_LIMIT:.0e} (PyTorch fp32: "
                f"{self.reference_error:.2e})"
            )
        if self.fp64_error is None and not (
            self.max_abs_diff <= TOLERANCE * self.scale
            or self.onnx_error <= max(TOLERANCE, 2 * self.reference_error)
        ):  # no fp64 run: only fp32's figures to go by
            return (
                f"output {self.name}: ONNX Runtime's fp32 run is {self.onnx_error:.2e} (relative) "
                f"from PyTorch's fp64 run, more than twice PyTorch fp32's "
                f"{self.reference_error:.2e} (no fp64 run of the export to tell rounding apart)"
            )
        return None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "scale": self.scale,
            "max_abs_diff": self.max_abs_diff,
            "onnx_error": self.onnx_error,
            "reference_error": self.reference_error,
            "fp64_error": self.fp64_error,
            "fp64_limit": self.fp64_limit,
            "ok": self.failure is None,
        }


@dataclass
class OnnxResult:
    path: Path  # the ORT-optimised model
    # the exporter's model: to_onnx keeps it only with keep_intermediate (else None); check_onnx's
    # is the model it ran in fp64
    raw_path: Path | None
    max_abs_diff: float  # ONNX Runtime vs PyTorch, both fp32, max over outputs and input sets
    providers: list[str]
    export_seconds: float
    optimize_seconds: float
    nodes: dict = field(default_factory=dict)  # {"raw": n, "optimized": n}
    fusions: FusionReport | None = None  # archfx's fusion stage (ir/fuse.py), when it ran
    # Max |Δ| over outputs against the graph run in fp64, of PyTorch's and of ONNX Runtime's fp32
    # outputs (absolute); set when max_abs_diff exceeds TOLERANCE (per output: `outputs`)
    reference_error: float | None = None
    onnx_error: float | None = None
    outputs: list[OutputCheck] = field(default_factory=list)  # per floating-point output
    fp64_model: str | None = None  # which model ran in fp64 ("raw": the exporter's); None: none
    notes: list[str] = field(default_factory=list)
    # every file to_onnx wrote: `path` first, then its external data (past the 2 GB protobuf
    # limit only), then the intermediates kept with keep_intermediate
    files: list[str] = field(default_factory=list)

    @property
    def fp64_error(self) -> float | None:
        """The largest relative error of the export's fp64 run (None: it did not run)."""
        errors = [o.fp64_error for o in self.outputs if o.fp64_error is not None]
        return max(errors) if errors else None

    @property
    def failure(self) -> str | None:
        """The first failing output's one-line reason; None when every output passes."""
        return next((f for o in self.outputs if (f := o.failure) is not None), None)

    @property
    def ok(self) -> bool:
        """Every output passes (`OutputCheck.failure`): the export run in fp64 agrees with
        PyTorch's fp64 run within FP64_TOLERANCE of the output's scale, and ONNX Runtime's fp32
        run is within FP32_LIMIT of it."""
        return self.failure is None

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "raw_path": None if self.raw_path is None else str(self.raw_path),
            "files": list(self.files),
            "ok": self.ok,
            "failure": self.failure,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": TOLERANCE,
            "fp32_limit": FP32_LIMIT,
            "fp64_tolerance": FP64_TOLERANCE,
            "reference_error": self.reference_error,
            "onnx_error": self.onnx_error,
            "fp64_error": self.fp64_error,
            "fp64_model": self.fp64_model,
            "outputs": [o.to_json() for o in self.outputs],
            "notes": list(self.notes),
            "providers": list(self.providers),
            "nodes": dict(self.nodes),
            "fusions": None if self.fusions is None else self.fusions.lines(),
        }


# ONNX Runtime's fp32 outputs within TOLERANCE (absolute) of PyTorch's: max_abs_diff's yardstick,
# and, relative, the fusion stage's and the no-fp64 fallback's floor
TOLERANCE = 1e-4
# The export with every float as double, run by ONNX Runtime with its graph optimisations off, vs
# the graph in fp64 (PyTorch), relative to each output's max |value|: an exact export agrees to
# ~1e-15 to 2e-10 across the zoo (SmolLM2's 30 layers: 1.2e-10); one weight matrix of a 6-layer
# Llama off by 1e-3 shows at 3.8e-6. The limit sits between the two, above what a scalar the
# exporter stores in fp32 and archfx cannot restore would add (half an fp32 ulp, 6e-8, times
# its reach): a correct export of a model outside the zoo must not fail on such a constant
FP64_TOLERANCE = 1e-7
# The same where ops with no fp64 kernel in ONNX Runtime ran in fp32 (cast in and out)
MIXED_TOLERANCE = 1e-5
# ONNX Runtime's fp32 run vs PyTorch fp64, relative: beyond this an output fails whatever fp64 says
FP32_LIMIT = 1e-3


def to_onnx(
    graph: Graph,
    path: str | Path,
    *,
    optimize: bool = True,
    fuse: bool = True,
    opset: int | None = None,
    strict: bool = True,
    keep_intermediate: bool = False,
) -> OnnxResult:
    """Export `graph` with the dynamo exporter at its dynamic shapes, rewrite it into ONNX
    Runtime's fused operators (`fuse`, ir/fuse.py: each group checked against PyTorch), optimise
    it with ONNX Runtime, save it to `path`, and check both input sets against PyTorch
    (`check_onnx`: per output, the export in fp64 and ONNX Runtime's fp32 run against the graph
    in fp64). `optimize=False` saves the exporter's model alone.

    `path` is self-contained: every weight inside it below the 2 GB protobuf limit, past it in
    one external-data file beside it, `<name>.data` (relative location: move the two together).
    The intermediates (the exporter's model, the fused one) are written to a temporary
    directory and deleted, unless `keep_intermediate`: then they stay beside `path` as
    `*.raw.onnx` and `*.fused.onnx` (+ `.data`). `OnnxResult.files` lists every file written.
    Raises OnnxMismatchError (a LoweringError; the result is its `.result`) when an output fails
    the check, unless `strict=False`."""
    import onnx

    path = Path(path)
    if any(n.target is DELTA for n in graph.gm.graph.nodes):
        raise LoweringError(
            "sdnc(write=delta): the delta-rule memory (a triangular solve per chunk of tokens, "
            "a loop over the chunks) has no ONNX form yet; torch.compile runs it"
        )
    empty = [
        n for n, t in zip(graph.inputs.names, graph.inputs.tensors, strict=True) if 0 in t.shape
    ]
    if empty:
        raise LoweringError(
            f"input {empty[0]} is empty in the example: the export would fix its size at 0 "
            "(give the graph a non-empty example)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="archfx-onnx-") as tmp:
        work = path.parent if keep_intermediate else Path(tmp)
        raw = work / path.with_suffix(".raw.onnx").name if optimize else path
        t0 = time.perf_counter()
        shapes = _dynamic_shapes(graph)
        gm = graph.gm
        if any(n.target in (torch.ops.aten.reshape.default, SINKHORN) for n in gm.graph.nodes):
            # the exported copy gets explicit layouts and Sinkhorn's ATen chain (ONNX has no
            # such op); `graph` is untouched
            gm = copy.deepcopy(gm)
            if explicit_reshape_copies(gm.graph) | explicit_sinkhorn(gm.graph):
                gm.recompile()
        sink = io.StringIO()
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(sink),
                contextlib.redirect_stderr(sink),
                _quiet(),
                exact_no_ops(),
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
                if raw == path:
                    _remove_stale_data(path)
                program.save(str(raw))  # past 2 GB: its weights in `<name>.data` beside it
        except Exception as exc:
            raise LoweringError(_export_failure(exc, gm)) from exc
        export_s = time.perf_counter() - t0
        sets = _input_sets(graph)
        exact = _fp64_outputs(graph, sets)

        def against_fp64(model: Path) -> dict[str, float]:
            """Per output, ONNX Runtime's fp32 error from PyTorch's fp64 run, relative to the
            output's max |value|, the largest over the input sets (the fusion stage's check)."""
            session = ort_session(model, level="basic")
            errors: dict[str, float] = {}
            for ins, xs in zip(sets, exact, strict=True):
                got = run_onnx(session, ins)
                if len(got) != len(xs):
                    raise LoweringError(f"{len(got)} outputs from ONNX Runtime, {len(xs)} expected")
                for name, a, x in zip(graph.output_names, got, xs, strict=True):
                    if x.is_floating_point():
                        e = _abs_err(torch.from_numpy(np.asarray(a)), x) / _scale(x)
                        errors[name] = max(errors.get(name, 0.0), e)
            return errors

        t1 = time.perf_counter()
        report = None
        if optimize and fuse:
            fused = work / path.with_suffix(".fused.onnx").name
            report = fuse_for_ort(
                raw, fused, providers=providers(), check=against_fp64, tolerance=TOLERANCE
            )
        if optimize:
            import onnxruntime as ort

            # ONNX Runtime writes the optimised model with its weights in one file of its own
            # (by default it would point into the fused model's data); `_save_self_contained`
            # then puts them inside `path`, or beside it as `<name>.data` past 2 GB
            optimized = Path(tmp) / "optimized" / "model.onnx"
            optimized.parent.mkdir()
            so = ort.SessionOptions()
            so.graph_optimization_level = (
                ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            )  # portable across providers
            so.optimized_model_filepath = str(optimized)
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "model.onnx.data"
            )
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
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
            _save_self_contained(optimized, path)
        optimize_s = time.perf_counter() - t1
        result = check_onnx(graph, path, raw=raw, strict=False, exact=exact)
        result.export_seconds, result.optimize_seconds = export_s, optimize_s
        result.nodes = {"raw": len(onnx.load(str(raw), load_external_data=False).graph.node)}
        result.fusions = report
        kept = keep_intermediate or not optimize  # the exporter's model outlives this call
        result.raw_path = raw if kept else None
        result.files = [str(f) for f in _model_files(path)]
        if optimize and keep_intermediate:
            for model in (raw, *([fused] if report is not None else [])):
                result.files += [str(f) for f in _model_files(model)]
    if optimize:
        final = onnx.load(str(path), load_external_data=False).graph.node
        result.nodes["optimized"] = len(final)
        if report is not None:
            report.runtime_ops = dict(
                Counter(n.op_type for n in final if n.domain == "com.microsoft")
            )
    if strict and not result.ok:
        raise OnnxMismatchError(result.failure, result)
    return result


# A model is saved in one protobuf file below this size (protobuf's 2 GB limit, less room for
# the non-tensor fields); past it its weights go to one external-data file beside it
PROTOBUF_LIMIT = 2**31 - 2**24


def _save_self_contained(source: Path, path: Path) -> None:
    """The ONNX model at `source` (external data wherever it points) saved to `path` alone, or
    with its weights in `<path name>.data` beside it (relative location) past PROTOBUF_LIMIT."""
    import onnx

    size = sum(f.stat().st_size for f in _model_files(source))
    model = onnx.load(str(source))  # its external data read in
    _remove_stale_data(path)
    if size < PROTOBUF_LIMIT:
        onnx.save(model, str(path), save_as_external_data=False)
    else:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )


def _remove_stale_data(path: Path) -> None:
    """Remove `<path name>.data` left by an earlier model at `path` (onnx appends to it)."""
    data = path.with_name(path.name + ".data")
    if data.is_file():
        data.unlink()


def _model_files(path: Path) -> list[Path]:
    """The ONNX model file and the external-data files its tensors point to."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(path), load_external_data=False)
    files = [path]
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in t.external_data if e.key == "location")
            f = path.parent / location
            if f not in files:
                files.append(f)
    return files


def check_onnx(
    graph: Graph,
    path: str | Path,
    *,
    raw: str | Path | None = None,
    strict: bool = True,
    exact: list | None = None,
) -> OnnxResult:
    """Check the ONNX model at `path` against `graph` on both input sets, per output (see
    `OutputCheck.failure`): ONNX Runtime's fp32 run against PyTorch's fp32 and fp64 runs, and
    the exporter's model `raw` (default `path`) with every float made double, run by ONNX
    Runtime, against PyTorch's fp64 run. Raises OnnxMismatchError when an output fails and
    `strict`. `exact`: PyTorch's fp64 outputs on each input set, when already computed."""
    path = Path(path)
    raw = path if raw is None else Path(raw)
    sets = _input_sets(graph)
    exact = exact if exact is not None else _fp64_outputs(graph, sets)
    session = ort_session(path)
    names = list(graph.output_names)
    result = OnnxResult(path, raw, 0.0, list(session.get_providers()), 0.0, 0.0)
    fp64_runs, result.fp64_model, result.notes = _run_in_fp64(raw, sets, path)
    per: dict[str, OutputCheck] = {}
    ref_abs = onnx_abs = 0.0
    for k, (ins, x64) in enumerate(zip(sets, exact, strict=True)):
        want = graph.run(ins)
        got = [torch.from_numpy(np.asarray(a)) for a in run_onnx(session, ins)]
        try:
            diffs = compare(want, got, names)
        except Exception as exc:
            raise LoweringError(f"ONNX Runtime's outputs do not match PyTorch's: {exc}") from exc
        result.max_abs_diff = max(result.max_abs_diff, *diffs.values())
        for i, (name, w, g, x) in enumerate(zip(names, want, got, x64, strict=True)):
            if not x.is_floating_point():
                continue
            scale = _scale(x)
            ref, err = _abs_err(w, x), _abs_err(g, x)
            ref_abs, onnx_abs = max(ref_abs, ref), max(onnx_abs, err)
            fp64 = None
            if fp64_runs is not None:
                fp64 = _abs_err(torch.from_numpy(np.asarray(fp64_runs[k][i])), x) / scale
            o = per.setdefault(name, OutputCheck(name, 0.0, 0.0, 0.0, 0.0))
            o.scale = max(o.scale, scale)
            o.max_abs_diff = max(o.max_abs_diff, diffs.get(name, 0.0))
            o.onnx_error = max(o.onnx_error, err / scale)
            o.reference_error = max(o.reference_error, ref / scale)
            if fp64 is not None:
                o.fp64_error = max(o.fp64_error or 0.0, fp64)
                o.fp64_limit = MIXED_TOLERANCE if result.notes else FP64_TOLERANCE
    result.outputs = list(per.values())
    if result.max_abs_diff > TOLERANCE:
        result.reference_error, result.onnx_error = ref_abs, onnx_abs
    if strict and not result.ok:
        raise OnnxMismatchError(result.failure, result)
    return result


_OP_NAME = re.compile(r"\b(?:aten|prims|[a-z_]+)(?:::|\.)[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)?")


def _export_failure(exc: BaseException, gm: fx.GraphModule) -> str:
    """The exporter's error in one line, with the ops it names (from anywhere in the chain of
    causes, where the first line is often generic) and canonicalize suggested only when the
    graph still holds what canonicalize rewrites."""
    texts, e = [], exc
    while e is not None and len(texts) < 8:
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    graph_ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    named = []
    for m in _OP_NAME.finditer("\n".join(texts)):
        op = m.group(0).replace("::", ".")
        if op not in named and any(g == op or g.startswith(op + ".") for g in graph_ops):
            named.append(op)
    where = f" at {', '.join(named[:3])}" if named else ""
    pending = [
        n.name
        for n in gm.graph.nodes
        if is_assert(n) or is_dropout_identity(n) or is_call(n, {aten.addmm.default})
    ]
    hint = (
        f"; canonicalize rewrites {len(pending)} nodes of this graph ({pending[0]} …) and may help"
        if pending
        else "; the graph is already canonical: report the op"
    )
    return f"ONNX export failed{where}: {first_line(exc, 300)}{hint}"


def _input_sets(graph: Graph) -> list[Inputs]:
    return [ins for ins in (graph.inputs, graph.second_inputs()) if ins is not None]


def _fp64_outputs(graph: Graph, sets: list[Inputs]) -> list[list[torch.Tensor]]:
    """The graph run in fp64 (PyTorch) on each input set."""
    gm = in_fp64(graph.gm)
    with torch.no_grad():
        return [
            list(gm(*[t.double() if t.is_floating_point() else t for t in ins.tensors]))
            for ins in sets
        ]


def _scale(x: torch.Tensor) -> float:
    """An output's scale: its max |value| (1 for an output that is all zeros or empty)."""
    m = float(x.abs().max()) if x.numel() else 0.0
    return m if m > 0 and np.isfinite(m) else 1.0


def _abs_err(a: torch.Tensor, x: torch.Tensor) -> float:
    """max |a − x| in fp64, NaN-aware (a NaN where x has none counts as infinite)."""
    if a.shape != x.shape or not a.numel():
        return 0.0 if a.shape == x.shape else float("inf")
    d = (a.double() - x.double()).abs()
    d = torch.where(torch.isnan(a) & torch.isnan(x), torch.zeros_like(d), d)
    d = torch.where(a == x, torch.zeros_like(d), d)  # equal infinities
    return float(torch.nan_to_num(d, nan=float("inf")).max())


def _against_fp64(graph: Graph, runs) -> tuple[float, float]:
    """Max |Δ| of PyTorch's and of ONNX Runtime's fp32 outputs from the graph run in fp64."""
    exact = _fp64_outputs(graph, [ins for ins, _, _ in runs])
    ref = onnx = 0.0
    for (_, expected, actual), xs in zip(runs, exact, strict=True):
        for e, a, x in zip(expected, actual, xs, strict=True):
            if x.is_floating_point():
                ref = max(ref, _abs_err(e, x))
                onnx = max(onnx, _abs_err(a, x))
    return ref, onnx


_FLOATS = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16
_DOUBLE = 11
_NO_KERNEL = (
    re.compile(r"Could not find an implementation for (\w+)\("),
    re.compile(r"Type 'tensor\(double\)' of \w+ parameter \([^)]*\) of operator \((\w+)\)"),
)


def _run_in_fp64(raw: Path, sets: list[Inputs], final: Path):
    """ONNX Runtime's run of the exporter's model `raw` with every float made double (graph
    optimisations off, CPU): ([outputs per input set] or None, which model, notes). Operators
    ONNX Runtime has no fp64 kernel for run in fp32 between casts, and the notes say which."""
    import onnx
    import onnxruntime as ort

    which = "raw" if raw != final else "final"
    islands: set[str] = set()
    types: dict[str, int] = {}  # value → element type, for the casts around islands
    names: dict[str, str] = {}  # island op → how the note names it
    present = {n.op_type for n in onnx.load(str(raw), load_external_data=False).graph.node}
    missing = trying = queue = None
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(24):
            model = onnx.load(str(raw))
            _make_double(model, islands, types)
            target = Path(tmp) / "fp64.onnx"
            for f in Path(tmp).iterdir():
                f.unlink()
            onnx.save(model, str(target), save_as_external_data=True, location="fp64.data")
            del model
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 3
            try:
                session = ort.InferenceSession(str(target), so, providers=["CPUExecutionProvider"])
            except Exception as exc:
                op = next((m.group(1) for p in _NO_KERNEL if (m := p.search(str(exc)))), None)
                if op is None:
                    return None, None, [f"no fp64 run of the export: {first_line(exc, 200)}"]
                if op == missing and trying is not None:  # islanding `trying` did not help
                    islands.discard(trying)
                    names.pop(trying)
                elif op != missing:
                    queue = None
                missing, trying = op, None
                if op in present and op not in islands:
                    islands.add(op)
                    names[op] = op
                else:  # an op of a function ONNX Runtime expanded: find which, one at a time
                    if queue is None:
                        queue = sorted(
                            (t for t in present if _is_function(t) and t not in islands),
                            key=lambda t: (t != "Gelu", t),
                        )
                    if not queue:
                        return None, None, [f"no fp64 run of the export: {first_line(exc, 200)}"]
                    trying = queue.pop(0)
                    islands.add(trying)
                    names[trying] = f"{trying} (its {op})"
                if not types:
                    inferred = onnx.shape_inference.infer_shapes(
                        onnx.load(str(raw), load_external_data=False)
                    )
                    types = {
                        vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
                    }
                continue
            outs = []
            for ins in sets:
                feed = {
                    i.name: (t.double() if t.is_floating_point() else t).detach().cpu().numpy()
                    for i, t in zip(session.get_inputs(), ins.tensors, strict=True)
                }
                try:
                    outs.append(session.run(None, feed))
                except Exception as exc:
                    return None, None, [f"no fp64 run of the export: {first_line(exc, 200)}"]
            notes = []
            if islands:
                notes.append(
                    f"ONNX Runtime has no fp64 CPU kernel for {', '.join(sorted(names.values()))}: "
                    f"those ran in fp32 in the fp64 run (tolerance {MIXED_TOLERANCE:.0e})"
                )
            return outs, which, notes
    return None, None, ["no fp64 run of the export: too many operators without an fp64 kernel"]


def _as_double(a: np.ndarray) -> np.ndarray:
    """`a` as float64; a scalar is restored to the double it was rounded from (`_exact`)."""
    if a.size == 1 and a.dtype == np.float32:
        return np.full(a.shape, _exact(float(a.reshape(-1)[0])), np.float64)
    return a.astype(np.float64)


@functools.cache
def _closed_forms() -> dict[float, float]:
    """fp32 value → the double it rounds from, for √(2/π) (the tanh GELU's), π, e, ln 2, and
    √n, 1/√n, n^¼ and n^-¼ (n = 2 … 4096)."""
    out: dict[float, float] = {
        float(np.float32(x)): x for x in (math.sqrt(2 / math.pi), math.pi, math.e, math.log(2))
    }
    for n in range(2, 4097):
        for x in (n**0.5, n**-0.5, n**0.25, n**-0.25):
            out.setdefault(float(np.float32(x)), x)
    return out


def _exact(c: float) -> float:
    """The double a scalar fp32 constant of the export most likely stands for. The exporter
    rounds scalars to fp32 (the SDPA decomposition scales q and k by √scale each: √(1/8) for a
    head of 64 is off by 1.7e-8 in fp32, 3.4e-8 in the scores), which the fp64 run would count
    as an error of the export. A closed form (√n, n^±¼) or the shortest decimal (1e-05) that
    rounds to `c` is taken instead; a wrong guess is off by at most half an fp32 ulp, as `c`."""
    if not np.isfinite(c) or not 1e-30 < abs(c) < 1e30 or float(np.float32(c)) != c:
        return c
    form = _closed_forms().get(abs(c))
    if form is not None:
        return float(np.copysign(form, c))
    decimal = float(np.format_float_positional(np.float32(c), unique=True, trim="-"))
    return decimal if float(np.float32(decimal)) == c else c


def _is_function(op_type: str) -> bool:
    """Whether ONNX defines `op_type` as a function (ONNX Runtime expands those it has no
    kernel for, e.g. Gelu into Erf and friends)."""
    from onnx import defs

    try:
        schema = defs.get_schema(op_type)
    except Exception:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


def _make_double(model, islands: set[str], types: dict[str, int]) -> None:
    """Every FLOAT / FLOAT16 / BFLOAT16 of `model` (values, initializers, constants, casts) as
    DOUBLE, in place; nodes whose op type is in `islands` run in fp32 between casts."""
    _graph_double(model.graph, islands, types)
    for f in model.functions:
        _nodes_double(f.node, islands, types, f.node)


def _graph_double(g, islands: set[str], known: dict[str, int]) -> None:
    from onnx import numpy_helper

    types = dict(known)
    for t in g.initializer:
        types[t.name] = t.data_type
        if t.data_type in _FLOATS:
            t.CopyFrom(numpy_helper.from_array(_as_double(numpy_helper.to_array(t)), t.name))
    for vi in [*g.input, *g.output, *g.value_info]:
        tt = vi.type.tensor_type
        types.setdefault(vi.name, tt.elem_type)
        if tt.elem_type in _FLOATS:
            tt.elem_type = _DOUBLE
    _nodes_double(g.node, islands, types, g.node)


def _nodes_double(nodes, islands: set[str], types: dict, container) -> None:
    from onnx import AttributeProto, helper, numpy_helper

    def tensor(t):
        if t.data_type in _FLOATS:
            t.CopyFrom(numpy_helper.from_array(_as_double(numpy_helper.to_array(t)), t.name))

    new = []
    for node in nodes:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                tensor(a.t)
            elif a.type == AttributeProto.GRAPH:
                _graph_double(a.g, islands, types)
            elif a.type == AttributeProto.GRAPHS:
                for s in a.graphs:
                    _graph_double(s, islands, types)
            elif a.name in ("to", "dtype") and a.type == AttributeProto.INT and a.i in _FLOATS:
                a.i = _DOUBLE
        if node.op_type == "Constant":
            for a in list(node.attribute):
                if a.name in ("value_float", "value_floats"):
                    v = _as_double(
                        np.array(a.f if a.name == "value_float" else list(a.floats), np.float32)
                    )
                    node.attribute.remove(a)
                    node.attribute.append(
                        helper.make_attribute("value", numpy_helper.from_array(v))
                    )
        gelu = _tanh_gelu(node, len(new))  # in double even when erf Gelus are fp32 islands
        if gelu is not None or node.op_type not in islands:
            new.extend(gelu or [node])
            continue
        for j, name in enumerate(node.input):  # fp32 inside, double outside
            if name and types.get(name) in _FLOATS:
                inner = f"{name}__f32_{len(new)}"
                new.append(helper.make_node("Cast", [name], [inner], to=1))
                node.input[j] = inner
        new.append(node)
        for j, name in enumerate(node.output):
            if name and types.get(name) in _FLOATS:
                node.output[j] = inner = f"{name}__f32_{len(new)}"
                new.append(helper.make_node("Cast", [inner], [name], to=_DOUBLE))
    del container[:]
    container.extend(new)


def _tanh_gelu(node, k: int) -> list | None:
    """A tanh Gelu written out in double, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as
    PyTorch computes it; None for any other node. ONNX Runtime has no fp64 Gelu kernel and
    expands the op's ONNX function itself, with √(2/π) and 0.044715 rounded to fp32 (1.2e-9
    relative in Gelu alone, 4.6e-9 in Gemma 2's logits) where `_exact` cannot restore them."""
    from onnx import helper, numpy_helper

    approximate = next((a.s for a in node.attribute if a.name == "approximate"), b"none")
    if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx") or approximate != b"tanh":
        return None
    x, (y,) = node.input[0], node.output
    v = f"{y}__gelu{k}"

    def const(name: str, value: float):
        t = numpy_helper.from_array(np.array(value, np.float64), f"{v}_{name}")
        return helper.make_node("Constant", [], [t.name], value=t)

    return [
        const("beta", math.sqrt(2 / math.pi)),
        const("kappa", 0.044715),
        const("half", 0.5),
        const("one", 1.0),
        helper.make_node("Mul", [x, x], [f"{v}_x2"]),
        helper.make_node("Mul", [f"{v}_x2", x], [f"{v}_x3"]),
        helper.make_node("Mul", [f"{v}_kappa", f"{v}_x3"], [f"{v}_kx3"]),
        helper.make_node("Add", [x, f"{v}_kx3"], [f"{v}_sum"]),
        helper.make_node("Mul", [f"{v}_beta", f"{v}_sum"], [f"{v}_inner"]),
        helper.make_node("Tanh", [f"{v}_inner"], [f"{v}_tanh"]),
        helper.make_node("Add", [f"{v}_one", f"{v}_tanh"], [f"{v}_gate"]),
        helper.make_node("Mul", [f"{v}_half", x], [f"{v}_halfx"]),
        helper.make_node("Mul", [f"{v}_halfx", f"{v}_gate"], [y]),
    ]


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
