"""What the pipeline runs around each pass (MLIR's pass instrumentation): each instrument's
`before` sees the graph the pass is about to edit, its `after` the pass's input and output.
Befores run in list order, afters in reverse, so the first instrument is the outermost.

    Dump      the IR before and after the pass, to `dump_dir`
    Certify   the certificate of a pass that claims exactness (docs/architecture.md): the pass
              applied again to an fp64 copy of its input, the outputs compared
    Measure   time, nodes and parameters before and after (the pass and its shape check)
    ShapeCheck  symbolic shapes re-propagated (incrementally) and the graph linted

An exception from an instrument fails the pass like one from the pass itself (the pipeline
names the pass and keeps a reproducer).
"""

from __future__ import annotations

import time
from pathlib import Path

from archfx.ir import AnalysisError, ArchfxError, Graph, PassError, VerificationError
from archfx.ir.errors import first_line
from archfx.ir.verify import (
    Certificate,
    Runs,
    align,
    certify_runs,
    check_rounding,
    compose,
    exact_copy,
    input_sets,
    lint,
    redo_in_precision,
    refresh_shapes,
    shape_signature,
)

from .base import Pass


class Instrument:
    def before(self, i: int, p: Pass, graph: Graph, record) -> None:
        """`graph`: what pass `i` is about to edit; `record`: its PassRecord."""

    def after(self, i: int, p: Pass, before: Graph, after: Graph, record) -> None:
        """`before`: the pass's input (kept unmodified when the pass is certified), `after`:
        what it made."""


class ShapeCheck(Instrument):
    def before(self, i, p, graph, record):
        self.signature = shape_signature(graph)

    def after(self, i, p, before, after, record):
        refresh_shapes(after, since=self.signature)
        lint(after)


class Measure(Instrument):
    def before(self, i, p, graph, record):
        record.nodes_before, record.params_before = graph.num_nodes(), graph.num_parameters()
        self.t0 = time.perf_counter()

    def after(self, i, p, before, after, record):
        record.seconds = time.perf_counter() - self.t0
        record.nodes_after, record.params_after = after.num_nodes(), after.num_parameters()


class Dump(Instrument):
    def __init__(self, where: Path):
        self.where = where

    def before(self, i, p, graph, record):
        self.code = graph.gm.code

    def after(self, i, p, before, after, record):
        self.where.mkdir(parents=True, exist_ok=True)
        (self.where / f"{i:02d}-{p.name}.before.py").write_text(self.code)
        (self.where / f"{i:02d}-{p.name}.after.py").write_text(after.gm.code)


class Certify(Instrument):
    """Keeps an exact copy of the model in step with the pipeline (every pass applied to it
    too) and certifies each pass that claims exactness against it; at the end, the whole
    pipeline (`whole`) when every pass claimed it."""

    def __init__(self, graph: Graph):
        if graph.device.type == "meta":
            raise VerificationError(
                "a meta-device model has no values to certify; run with verify off "
                "(--verify not given) or on a model with weights"
            )
        self.names, self.notes = graph.output_names, []
        self.exact, self.runs = exact_copy(graph, self.notes)
        self.first: Runs = self.runs
        self.last: Runs | None = None

    def after(self, i, p, before, after, record):
        certified = p.claims_exact()
        if certified and self.runs is None:  # a pass before this one claimed nothing (and
            # may have changed the inputs: sdnc's persistent memory adds some)
            self.runs = Runs.of(before, self.exact, input_sets(before, self.exact, self.notes))
        _on_exact_copy(p, self.exact)
        redo_in_precision(self.exact, self.first.precision)
        runs = Runs.of(after, self.exact, self.runs.sets) if certified else None
        if certified:
            cert = certify_runs(self.runs, runs, before.output_names, p.widens_outputs, self.notes)
            cert.rounding = check_rounding(before, after, self.exact)
            record.certificate, self.last = cert, runs
            if not cert.ok:
                raise VerificationError(
                    f"claims to preserve the function but changed it: {cert.reason()}"
                )
        self.runs = runs
        if align(self.exact, after):  # the next pass gets the rounded weights: so does the copy
            self.runs = None

    def whole(self, records: list, passes: list[Pass]) -> Certificate | None:
        """The whole pipeline's certificate, when every pass claimed exactness."""
        if not records or not all(r.preserves for r in records):
            return None
        certs = [r.certificate for r in records]
        if len(records) == 1:
            return certs[0]
        widened = any(p.widens_outputs for p in passes)
        return compose(certs, self.first, self.last, self.names, widened)


def _on_exact_copy(p: Pass, exact: Graph) -> None:
    """Pass `p` applied to the fp64 copy (in place), shape-checked and linted."""
    signature = shape_signature(exact)
    try:
        p.run(exact)
    except (PassError, AnalysisError) as exc:  # it ran in the model's dtype
        raise VerificationError(
            f"cannot be certified: on the fp64 copy of its input it refused: {exc}"
        ) from exc
    except ArchfxError:
        raise
    except Exception as exc:
        raise VerificationError(f"failed on the fp64 copy of its input: {first_line(exc)}") from exc
    exact.invalidate()
    refresh_shapes(exact, since=signature)
    lint(exact)
