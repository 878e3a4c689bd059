"""`Pipeline`: passes in order, parsed from and printed to a round-trippable text.

    altup(k=2),expand-mlp(factor=2)

After each pass: lint, shape propagation, and for passes that preserve the function a
numerical certificate against the pass's input. Instrumentation records time, nodes and
parameters changed per pass; `dump_dir` writes the IR before and after each pass; a failing
pass leaves a reproducer (pipeline text, the IR it received, the error) in `dump_dir` or a new
directory under $ARCHFX_CACHE/reproducers (default ~/.cache/archfx), named in the error.
Errors raised while a pass runs are prefixed with the pass once (passes do not name
themselves).
"""

from __future__ import annotations

import re
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from archfx.ir import AnalysisError, ArchfxError, Graph, PassError, VerificationError
from archfx.ir.errors import first_line
from archfx.ir.serialize import cache_dir
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

from .base import PROPERTIES, Pass, PassResult, Remark, get

_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_VALUE = re.compile(r"[^,()=\s]+")


@dataclass
class PassRecord:
    name: str
    preserves: bool
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    remarks: list[Remark] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    certificate: Certificate | None = None
    tensor_maps: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "preserves": self.preserves,
            "changed": self.changed,
            "seconds": round(self.seconds, 4),
            "nodes": {"before": self.nodes_before, "after": self.nodes_after},
            "params": {"before": self.params_before, "after": self.params_after},
            "remarks": [str(r) for r in self.remarks],
            "details": self.details,
            "certificate": self.certificate.to_json() if self.certificate else None,
        }


@dataclass
class PipelineResult:
    graph: Graph
    records: list[PassRecord]
    certificate: Certificate | None = None  # the whole pipeline, when every pass preserves

    @property
    def preserves(self) -> bool:
        return all(r.preserves for r in self.records)


class Pipeline:
    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)
        check_order(self.passes)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Parse `name(opt=value,...),name,...`; every error names the column and what was expected."""
        if not isinstance(text, str) or not text.strip():
            raise PassError(
                "empty pipeline: give passes like 'canonicalize' or 'altup(k=2),canonicalize'"
            )
        passes, pos, n = [], 0, len(text)

        def skip(p: int) -> int:
            while p < n and text[p].isspace():
                p += 1
            return p

        def fail(p: int, expected: str):
            got = repr(text[p]) if p < n else "end of text"
            raise PassError(
                f"malformed pipeline at column {p + 1}: expected {expected}, got {got} in {text!r}"
            )

        while True:
            pos = skip(pos)
            m = _NAME.match(text, pos)
            if not m:
                fail(pos, "a pass name")
            name, pos = m.group(), m.end()
            args: dict[str, str] = {}
            pos = skip(pos)
            if pos < n and text[pos] == "(":
                pos = skip(pos + 1)
                if pos < n and text[pos] == ")":
                    pos += 1
                else:
                    while True:
                        pos = skip(pos)
                        k = _NAME.match(text, pos)
                        if not k:
                            fail(pos, "an option name")
                        pos = skip(k.end())
                        if pos >= n or text[pos] != "=":
                            fail(pos, "'='")
                        pos = skip(pos + 1)
                        v = _VALUE.match(text, pos)
                        if not v:
                            fail(pos, "an option value")
                        if k.group() in args:
                            raise PassError(f"{name}: option {k.group()} given twice")
                        args[k.group()] = v.group()
                        pos = skip(v.end())
                        if pos < n and text[pos] == ",":
                            pos += 1
                            continue
                        if pos < n and text[pos] == ")":
                            pos += 1
                            break
                        fail(pos, "',' or ')'")
            passes.append(get(name).from_text(args))
            pos = skip(pos)
            if pos >= n:
                break
            if text[pos] != ",":
                fail(pos, "',' between passes")
            pos += 1
        return cls(passes)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def run(
        self,
        graph: Graph,
        *,
        verify: bool = True,
        dump_dir: str | Path | None = None,
        on_pass: Callable[[int, Pass], None] | None = None,
        inplace: bool = False,
    ) -> PipelineResult:
        """Run every pass on a copy of `graph` (which is never modified). With `inplace`, the
        passes edit `graph` itself: no second copy of the weights, for models too large to
        hold twice; there is then no input to certify against, so `verify` must be False.
        The copy is made once; a pass whose function is certified gets a copy of its own,
        since its input is kept to run against."""
        if inplace and verify:
            raise PassError(
                "inplace=True leaves no input graph to certify against; pass verify=False "
                "(or certify on a smaller model)"
            )
        history = self._history(graph)
        current, owned = graph, inplace
        notes: list[str] = []
        exact, runs = self._exact(graph, notes) if verify else (None, None)
        first_runs, records = runs, []
        for i, p in enumerate(self.passes):
            if on_pass:
                on_pass(i, p)
            certified = verify and p.claims_exact()
            work = current if owned and not certified else current.copy()
            code, nodes, params = current.gm.code, current.num_nodes(), current.num_parameters()
            t0 = time.perf_counter()
            result = self._apply(i, p, work, graph, code, dump_dir)
            seconds = time.perf_counter() - t0
            record = PassRecord(
                name=str(p),
                preserves=p.claims_exact(),
                changed=result.changed,
                seconds=seconds,
                nodes_before=nodes,
                nodes_after=work.num_nodes(),
                params_before=params,
                params_after=work.num_parameters(),
                remarks=result.remarks,
                details=result.details,
                tensor_maps=result.tensor_maps,
            )
            if exact is not None:  # the same pass on the exact copy, edited in place
                if certified and runs is None:  # a pass before this one claimed nothing (and
                    # may have changed the inputs: sdnc's persistent memory adds some)
                    runs = Runs.of(current, exact, input_sets(current, exact, notes))
                self._apply(i, p, exact, graph, code, dump_dir, exact=True)
                redo_in_precision(exact, first_runs.precision)
                after = Runs.of(work, exact, runs.sets) if certified else None
                if certified:
                    names = current.output_names
                    cert = certify_runs(runs, after, names, p.widens_outputs, notes)
                    last_runs = after
                    cert.rounding = check_rounding(current, work, exact)
                    record.certificate = cert
                    if not cert.ok:
                        where = self._reproduce(i, p, graph, code, None, dump_dir)
                        raise VerificationError(
                            f"{p}: claims to preserve the function but changed it: "
                            f"{cert.reason()}; reproducer in {where}"
                        )
                runs = after
                if align(exact, work):  # the next pass gets the rounded weights: so does its copy
                    runs = None
            if dump_dir is not None:
                d = Path(dump_dir)
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:02d}-{p.name}.before.py").write_text(code)
                (d / f"{i:02d}-{p.name}.after.py").write_text(work.gm.code)
            records.append(record)
            current, owned = work, True
        whole = None
        if exact is not None and records and all(r.preserves for r in records):
            widened = any(p.widens_outputs for p in self.passes)
            last = last_runs if len(records) > 1 else None
            certs = [r.certificate for r in records]
            whole = (
                certs[0]
                if last is None
                else compose(certs, first_runs, last, graph.output_names, widened)
            )
        current.provenance["pipeline"] = ",".join(str(p) for p in history + self.passes)
        return PipelineResult(current, records, whole)

    def _history(self, graph: Graph) -> list[Pass]:
        """The passes that made `graph` (its provenance), checked with this pipeline's after
        them."""
        done = graph.provenance.get("pipeline")
        history = Pipeline.parse(done).passes if done else []
        check_order(history + self.passes, len(history))
        return history

    def _exact(self, graph: Graph, notes: list[str]) -> tuple[Graph | None, Runs | None]:
        """The input in the precision the math is certified in (fp64, or fp32 where fp64
        cannot run) and the runs of both, when some pass claims exactness; every pass runs on
        that copy too."""
        if not any(p.claims_exact() for p in self.passes):
            return None, None
        if graph.device.type == "meta":
            raise VerificationError(
                "a meta-device model has no values to certify; run with verify off "
                "(--verify not given) or on a model with weights"
            )
        return exact_copy(graph, notes)

    def _apply(
        self, i: int, p: Pass, work: Graph, graph: Graph, code: str, dump_dir, exact=False
    ) -> PassResult:
        """Run pass `i` on `work` (in place), then the shape check and lint. Errors that are
        not a refusal keep a reproducer. `exact`: `work` is the fp64 copy the certificate
        runs the pass on."""
        try:
            before = shape_signature(work)
            result = p.run(work)
            work.invalidate()
            refresh_shapes(work, since=before)
            lint(work)
        except (PassError, AnalysisError) as exc:
            if exact:  # the pass ran in the model's dtype but refuses in fp64
                where = self._reproduce(i, p, graph, code, exc, dump_dir)
                raise VerificationError(
                    f"{p}: cannot be certified: on the fp64 copy of its input it refused: "
                    f"{exc}; reproducer in {where}"
                ) from exc
            # a refusal that names its site and reason: nothing to reproduce
            raise type(exc)(f"{p}: {exc}") from exc
        except ArchfxError as exc:  # the shape check or lint failed: the pass broke the IR
            where = self._reproduce(i, p, graph, code, exc, dump_dir)
            raise type(exc)(f"{p}: {exc}; reproducer in {where}") from exc
        except Exception as exc:  # a bug in a pass: keep the reproducer, raise a clear error
            where = self._reproduce(i, p, graph, code, exc, dump_dir)
            on = " on the fp64 copy of its input" if exact else ""
            raise PassError(f"{p}: failed{on}: {first_line(exc)}; reproducer in {where}") from exc
        return result

    def _reproduce(
        self, i: int, p: Pass, graph: Graph, code: str, exc: BaseException | None, dump_dir
    ) -> str:
        """Write what reproduces pass `i`'s failure: the pipeline, the IR the pass received
        (`code`), the model it came from and the error."""
        if dump_dir is not None:
            d = Path(dump_dir)
        else:
            root = cache_dir() / "reproducers"
            root.mkdir(parents=True, exist_ok=True)
            d = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))
        d.mkdir(parents=True, exist_ok=True)
        (d / "pipeline.txt").write_text(
            f"{self}\nfailed at pass {i}: {p}\nmodel: {graph.provenance}\n"
        )
        (d / "input-graph.py").write_text(code)
        if exc is not None:
            (d / "error.txt").write_text("".join(traceback.format_exception(exc)))
        return str(d)


def check_order(passes: list[Pass], start: int = 0) -> None:
    """Refuse an order of passes that no model allows, naming the rule: a pass needs a property
    (PROPERTIES) an earlier pass took away, or its own `check_order` refuses what precedes it.
    The passes before `start` already ran (a graph's provenance) and are not checked."""
    removed: dict[str, Pass] = {}
    for i, p in enumerate(passes):
        if i >= start:
            for prop in sorted(p.requires):
                if prop in removed:
                    q = removed[prop]
                    raise PassError(
                        f"{p}: needs {PROPERTIES[prop]}, and {q} before it leaves none: "
                        f"{q.invalidates[prop]}"
                    )
            try:
                p.check_order(passes[:i])
            except PassError as exc:
                raise PassError(f"{p}: {exc}") from None
        removed.update(dict.fromkeys(p.invalidates, p))
