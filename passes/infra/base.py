"""The pass contract: a name, typed options, whether the function is preserved, and a result
that says what changed and why each site that was not rewritten was left alone."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from archfx.ir import Graph, PassError

_MISSING = object()

# Properties of a graph that passes need (`Pass.requires`) and take away (`Pass.invalidates`);
# a captured model has all of them. `Pipeline` checks the order against them before it runs.
PROPERTIES = {
    "structure": "Transformer blocks the analysis recognises",
    "block-residual": "layers that no block scheme (AltUp) runs on its state yet",
    "site-residual": "residual adds that no site scheme (DDL) has made updates of its state yet",
    "softmax-attention": "attention that is not yet a memory read",
    "identity-layer": "a layer whose branches output zero leaves the stream unchanged",
}


@dataclass(frozen=True)
class Option:
    """A declared pass option: parsed from pipeline text, checked, documented."""

    name: str
    type: type
    default: Any
    doc: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, owner: str, text: str) -> Any:
        """Convert pipeline text to this option's type (then `check`)."""
        text = text.strip()
        try:
            if self.type is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text.lower() in ("true", "1")
            elif self.type is int:
                value = int(text)
            elif self.type is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            raise PassError(
                f"{owner}: option {self.name} expects {self.describe_type()}, got {text!r}"
            ) from None
        return self.check(owner, value)

    def check(self, owner: str, value: Any) -> Any:
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise PassError(
                f"{owner}: option {self.name} expects {self.describe_type()}, got {value!r}"
            )
        if self.type is float and not math.isfinite(value):
            raise PassError(f"{owner}: option {self.name} must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise PassError(
                f"{owner}: option {self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
            )
        if self.minimum is not None and value < self.minimum:
            raise PassError(f"{owner}: option {self.name} must be ≥ {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise PassError(f"{owner}: option {self.name} must be ≤ {self.maximum}, got {value!r}")
        return value

    def describe_type(self) -> str:
        if self.choices:
            return "one of " + "|".join(map(str, self.choices))
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        return names.get(self.type, self.type.__name__)

    def values(self) -> str:
        """The values this option takes, as the docs' tables show them."""
        if self.choices:
            return " \\| ".join(f"`{_fmt(c)}`" for c in self.choices)
        kind = {bool: "`true` \\| `false`", int: "integer", float: "number", str: "text"}
        text = kind.get(self.type, self.type.__name__)
        if self.minimum is not None and self.maximum is not None:
            return f"{text} in [{_fmt(self.minimum)}, {_fmt(self.maximum)}]"
        if self.minimum is not None:
            return f"{text} ≥ {_fmt(self.minimum)}"
        return text

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "doc": self.doc,
            "choices": list(self.choices) if self.choices else None,
            "minimum": self.minimum,
            "maximum": self.maximum,
        }


@dataclass
class Remark:
    """A site a pass looked at and did not rewrite, and why (a missed-optimisation remark)."""

    site: str
    reason: str

    def __str__(self) -> str:
        return f"{self.site}: {self.reason}"


@dataclass
class PassResult:
    changed: bool
    remarks: list[Remark] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    # how tensors moved, for state that follows the weights (optimizer moments): per name, the
    # source index of every new position per grown axis ("layouts"), and renames ("renamed")
    tensor_maps: dict = field(default_factory=dict)


class Pass:
    """Base class of every rewrite. Subclasses declare `name`, `summary`, `options`,
    `exact_when` and implement `run(graph)`, which edits `graph` in place (the pipeline hands it
    a copy)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    # When the rewrite preserves the model's function: every option named here takes one of its
    # listed values ({}: always). The one statement of exactness: `claims_exact`, `archfx
    # passes` and the docs are derived from it; `register` checks it against the options.
    exact_when: ClassVar[dict[str, tuple]] = {}
    # The contract with the passes before it (PROPERTIES): what the graph must still have, and
    # what this rewrite takes away, each with the reason.
    requires: ClassVar[frozenset[str]] = frozenset({"structure"})
    invalidates: ClassVar[dict[str, str]] = {}
    widens_outputs: ClassVar[bool] = False  # outputs may gain features (compared on the old ones)

    def __init__(self, **values: Any):
        declared = {o.name: o for o in self.options}
        self.given: dict[str, Any] = {}
        for key, value in values.items():
            if key not in declared:
                raise PassError(f"{self.name}: unknown option {key!r}{_suggest(key, declared)}")
            self.given[key] = declared[key].check(self.name, value)
        self.opts = {o.name: self.given.get(o.name, o.default) for o in self.options}
        try:
            self.validate()
        except PassError as exc:  # like the pipeline does at run time: the pass named once
            raise PassError(f"{self.name}: {exc}") from None

    def validate(self) -> None:
        """Check combinations of options (one option alone is checked by its `Option`). Runs
        at construction, so `Pipeline.parse` (and the CLI, before it loads a model) reports
        the error; raise PassError (without the pass's name: it is added). What depends on the
        model belongs in `run`."""

    @classmethod
    def from_text(cls, args: dict[str, str]) -> Pass:
        declared = {o.name: o for o in cls.options}
        values = {}
        for key, text in args.items():
            if key not in declared:
                raise PassError(f"{cls.name}: unknown option {key!r}{_suggest(key, declared)}")
            values[key] = declared[key].parse(cls.name, text)
        return cls(**values)

    def check_order(self, before: list[Pass]) -> None:
        """Refuse an order with the passes `before` this one that no model allows, beyond the
        declared properties (raise PassError, without the pass's name: it is added). Runs in
        `Pipeline.parse`, before any model loads."""

    def claims_exact(self) -> bool:
        """Whether this instance (with its options) claims to preserve the function."""
        return all(self.opts[name] in values for name, values in self.exact_when.items())

    @classmethod
    def exact_when_text(cls) -> str:
        """`exact_when` as pipeline text: "always", or "value=compat, method=auto|zero"."""
        return (
            ", ".join(
                f"{name}={'|'.join(_fmt(v) for v in values)}"
                for name, values in cls.exact_when.items()
            )
            or "always"
        )

    def run(self, graph: Graph) -> PassResult:
        raise NotImplementedError

    def __str__(self) -> str:
        if not self.given:
            return self.name
        parts = [
            f"{o.name}={_fmt(self.given[o.name])}" for o in self.options if o.name in self.given
        ]
        return f"{self.name}({','.join(parts)})"

    @classmethod
    def signature(cls) -> str:
        """`name(option, …)` as the docs list passes."""
        return cls.name + (f"({', '.join(o.name for o in cls.options)})" if cls.options else "")

    @classmethod
    def to_markdown(cls) -> str:
        """This pass's section of the generated reference (`archfx passes --markdown`)."""
        rows = [
            f"### `{cls.signature()}`",
            "",
            f"{cls.summary}. Exact: {cls.exact_when_text().replace('|', ' or ')}. Requires: "
            + (", ".join(f"`{r}`" for r in sorted(cls.requires)) or "nothing")
            + "; takes away: "
            + (", ".join(f"`{r}`" for r in cls.invalidates) or "nothing")
            + ".",
        ]
        if cls.options:
            rows += ["", "| option | values | default | meaning |", "|---|---|---|---|"]
            rows += [
                f"| `{o.name}` | {o.values()} | `{_fmt(o.default)}` | {o.doc} |"
                for o in cls.options
            ]
        return "\n".join(rows)

    @classmethod
    def to_json(cls) -> dict:
        return {
            "name": cls.name,
            "summary": cls.summary,
            "exact_when": {name: list(values) for name, values in cls.exact_when.items()},
            "requires": sorted(cls.requires),
            "invalidates": dict(cls.invalidates),
            "options": [o.to_json() for o in cls.options],
        }


def layer_indices(text: str) -> list[int] | None:
    """A `layers` option ("all", or indices and ranges such as 0-3,7) as sorted block indices,
    None for all. Malformed text is refused here, from `validate`, before any model loads;
    whether the indices exist is the model's business (checked in `run`)."""
    if text.strip() == "all":
        return None
    chosen: set[int] = set()
    for part in text.replace(" ", "").split(","):
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                chosen.update(range(a, b + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise PassError(
                f"layers must be 'all' or indices and ranges like 0-3,7; got {text!r}"
            ) from None
    if not chosen or min(chosen) < 0:
        raise PassError(f"layers {text!r} names no blocks (indices start at 0)")
    return sorted(chosen)


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in REGISTRY:
        raise ValueError(f"pass {cls.name!r} registered twice")
    declared = {o.name: o for o in cls.options}
    for name, values in cls.exact_when.items():
        if name not in declared or not values:
            raise ValueError(f"{cls.name}: exact_when names {name!r}, not an option with values")
        for value in values:  # each value one the option accepts
            declared[name].check(cls.name, value)
    unknown = (set(cls.requires) | set(cls.invalidates)) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"{cls.name}: unknown properties {sorted(unknown)}")
    REGISTRY[cls.name] = cls
    return cls


def markdown_overview() -> str:
    """The table of every registered pass (README), from the registry."""
    rows = ["| pass | exact when | what it does |", "|---|---|---|"]
    for cls in REGISTRY.values():
        exact = cls.exact_when_text().replace("|", "\\|")
        rows.append(f"| `{cls.signature()}` | {exact} | {cls.summary} |")
    return "\n".join(rows)


def markdown_reference() -> str:
    """Every registered pass's section with its options (docs/passes.md), from the registry."""
    return "\n\n".join(cls.to_markdown() for cls in REGISTRY.values())


def get(name: str) -> type[Pass]:
    if name not in REGISTRY:
        raise PassError(
            f"unknown pass {name!r}{_suggest(name, REGISTRY)}; `archfx passes` lists them"
        )
    return REGISTRY[name]


def _suggest(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.5)
    return (
        f" (did you mean {' or '.join(close)}?)"
        if close
        else f" (known: {', '.join(sorted(known)) or 'none'})"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
