"""`Pipeline`: passes in order, parsed from and printed to a round-trippable text.

    altup(k=2),expand-mlp(factor=2)

Around each pass run the instruments (passes/infra/instruments.py): lint and shape propagation,
for passes that preserve the function a numerical certificate against the pass's input, time,
nodes and parameters, and with `dump_dir` the IR before and after each pass. A failing
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

from archfx.ir import AnalysisError, ArchfxError, Graph, PassError, PassFailure
from archfx.ir.errors import first_line
from archfx.ir.serialize import cache_dir
from archfx.ir.verify import Certificate

from .base import PROPERTIES, Pass, PassResult, Remark, get
from .instruments import Certify, Dump, Instrument, Measure, ShapeCheck

_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_VALUE = re.compile(r"[^,()=\s]+")


@dataclass
class PassRecord:
    name: str
    preserves: bool
    changed: bool = False
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    remarks: list[Remark] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    certificate: Certificate | None = None
    tensor_maps: dict = field(default_factory=dict, repr=False)

    def absorb(self, result: PassResult) -> None:
        """What the pass said about its run."""
        self.changed, self.remarks = result.changed, result.remarks
        self.details, self.tensor_maps = result.details, result.tensor_maps

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
        since its input is kept to run against.

        Around each pass run the instruments (`Instrument`): the shape check and lint, the
        certificate (`verify`), the IR dumps (`dump_dir`), and the measurements (time, nodes,
        parameters), closest to the pass. A failure that is not a refusal leaves a reproducer."""
        if inplace and verify:
            raise PassError(
                "inplace=True leaves no input graph to certify against; pass verify=False "
                "(or certify on a smaller model)"
            )
        history = self._history(graph)
        certify = Certify(graph) if verify and any(p.claims_exact() for p in self.passes) else None
        instruments: list[Instrument] = [  # the first is the outermost
            *([Dump(Path(dump_dir))] if dump_dir is not None else []),
            *([certify] if certify else []),
            Measure(),
            ShapeCheck(),
        ]
        current, owned, records = graph, inplace, []
        for i, p in enumerate(self.passes):
            if on_pass:
                on_pass(i, p)
            kept = certify is not None and p.claims_exact()  # its input is run against
            work = current if owned and not kept else current.copy()
            record = PassRecord(name=str(p), preserves=p.claims_exact())
            code = current.gm.code
            try:
                for ins in instruments:
                    ins.before(i, p, current, record)
                record.absorb(p.run(work))
                work.invalidate()
                for ins in reversed(instruments):
                    ins.after(i, p, current, work, record)
            except Exception as exc:
                raise self._failure(i, p, graph, code, exc, dump_dir) from exc
            records.append(record)
            current, owned = work, True
        current.provenance["pipeline"] = ",".join(str(p) for p in history + self.passes)
        whole = certify.whole(records, self.passes) if certify else None
        return PipelineResult(current, records, whole)

    def _history(self, graph: Graph) -> list[Pass]:
        """The passes that made `graph` (its provenance), checked with this pipeline's after
        them."""
        done = graph.provenance.get("pipeline")
        history = Pipeline.parse(done).passes if done else []
        check_order(history + self.passes, len(history))
        return history

    def _failure(
        self, i: int, p: Pass, graph: Graph, code: str, exc: Exception, dump_dir
    ) -> ArchfxError:
        """The error pass `i` ends the run with, naming the pass once: a refusal as it is (it
        names its site and reason); anything else (a broken IR, a failed certificate, a bug)
        with a reproducer."""
        if isinstance(exc, (PassError, AnalysisError)):
            return type(exc)(f"{p}: {exc}")
        where = self._reproduce(i, p, graph, code, exc, dump_dir)
        if isinstance(exc, ArchfxError):
            return type(exc)(f"{p}: {exc}; reproducer in {where}")
        return PassFailure(f"{p}: failed: {first_line(exc)}; reproducer in {where}")

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
