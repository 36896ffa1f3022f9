"""Recipes: ordered lists of compression stages, named presets, and parsing from a CLI string.

A recipe string joins stages with "+"; each stage is `name`, `name:VALUE` (the stage's main
parameter) or `name:key=value,key=value`:

    "none"                          no compression
    "kivi:2"                        KIVI 2-bit KV quantization
    "streaming:sink=4,recent=256"   StreamingLLM sink + recent eviction
    "streaming:recent=256+kivi:4"   evict, then quantize what is left

Stages run in data-path order: vision presses (before the LLM), then at most one prefill policy,
then KV presses (after prefill; at most one quantizing press, and it must come last). Every
stage is a dataclass registered with `@register`; its docstring cites its paper and defaults.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from .errors import RecipeError
from .stages import KINDS, STAGES, Stage, check, register  # noqa: F401  (re-exported)

# Named presets: recipe strings. Methods add theirs where they are defined.
# Presets: model-independent budgets (fractions of the visual tokens, of the keys, of the KV
# entries), chosen on task v2 of the quality benchmark (`mmkv bench quality --task long`,
# 1,024-frame videos, 600 questions, protocols encode and ask; BENCHMARKS.md "Presets").
PRESETS: dict[str, str] = {
    "none": "",
    "fast": "zipvl:ratio=0.05,dense_layers=1,kv=none",
    "balanced": "evs:0.25+kivi:2,salient=0.05",
    "extreme": "evs:0.25+observed:0.75,share=1,probes=16,merge=mass+kivi:2,salient=0.05",
}
PRESET_DOCS: dict[str, str] = {
    "none": "no compression: exactly the plain model",
    "fast": "ZipVL's sparse prefill: after one dense layer each layer attends to its 5% most important keys; "
            "the KV stays exact",
    "balanced": "25% of the visual tokens (EVS), then KIVI 2-bit KV with each head's 5% most-attended entries exact",
    "extreme": "25% of the visual tokens (EVS), 75% of the KV entries evicted by observed attention before the "
               "question (merged by mass), then KIVI 2-bit with 5% exact",
}


def add_preset(name: str, spec: str, doc: str) -> None:
    PRESETS[name] = spec
    PRESET_DOCS[name] = doc


def _ensure_registered() -> None:
    # Importing the method packages registers their stages.
    from . import cache, prefill, vision  # noqa: F401


def _convert(stage: type[Stage], key: str, raw: str):
    fields = {f.name: f for f in dataclasses.fields(stage)}
    if key not in fields:
        raise RecipeError(f"stage {stage.name!r} has no parameter {key!r}; its parameters are: "
                          f"{', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(stage)
    t = hints.get(key, str)
    origin = typing.get_origin(t)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        if raw.lower() in ("none", "null"):
            return None
        t = args[0]
    try:
        if t is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t is int:
            return int(raw)
        if t is float:
            return float(raw)
        if typing.get_origin(t) in (tuple, list):
            inner = typing.get_args(t)[0] if typing.get_args(t) else str
            return tuple(inner(x) for x in raw.split("/") if x)
        return t(raw) if t is not str else raw
    except (TypeError, ValueError):
        raise RecipeError(f"{stage.name}: {key}={raw!r} is not a valid {getattr(t, '__name__', t)}") from None


def parse_stage(text: str) -> Stage:
    """One stage from `name`, `name:VALUE` or `name:key=value,...`. Refuses an empty stage, an
    empty parameter and a parameter given twice (`kivi:bits=2,bits=4`, `kivi:2,bits=4`)."""
    _ensure_registered()
    text = text.strip()
    name, colon, arg = text.partition(":")
    name = name.strip().lower()
    if not name:
        raise RecipeError(f"empty stage name in {text!r}" if text else "empty stage")
    if name not in STAGES:
        raise RecipeError(f"unknown stage {name!r}. Valid stages: {', '.join(sorted(STAGES))}; "
                          f"presets: {', '.join(sorted(PRESETS))}")
    cls = STAGES[name]
    kwargs, given = {}, {}
    items = [a.strip() for a in arg.split(",")] if colon else []
    for item in items:
        if not item:
            raise RecipeError(f"{name}: empty parameter in {text!r} (nothing after ':' or between commas)")
        if "=" in item:
            k, _, v = item.partition("=")
            k = k.strip()
        elif cls.main is not None:
            k, v = cls.main, item
        else:
            k = None
        if k is not None and k in given:
            raise RecipeError(f"{name}: {k} is given twice ({given[k]!r} and {item!r}); give each parameter once")
        if k is not None:
            given[k] = item
            kwargs[k] = _convert(cls, k, v.strip())
        else:
            raise RecipeError(f"{name}: cannot read {item!r}; write key=value "
                              f"(parameters: {', '.join(f.name for f in dataclasses.fields(cls))})")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"{name}: {e}") from None


@dataclass
class Recipe:
    """An ordered list of stages. Build with `Recipe.parse("pvc:64+kivi:2")` or from stage objects."""

    stages: list[Stage] = field(default_factory=list)
    name: str | None = None

    def __post_init__(self):
        order = {k: i for i, k in enumerate(KINDS)}
        last = -1
        for s in self.stages:
            if not isinstance(s, Stage):
                raise RecipeError(f"recipe stages must be Stage objects, got {type(s).__name__}")
            if order[s.kind] < last:
                raise RecipeError(f"stage {s.name!r} ({s.kind}) is out of order: vision stages come first, then the "
                                  "prefill policy, then KV presses")
            last = order[s.kind]
        if len(self.prefill_stages) > 1:
            raise RecipeError("a recipe can have at most one prefill policy, got "
                              + ", ".join(s.name for s in self.prefill_stages))
        quant = [i for i, s in enumerate(self.kv) if getattr(s, "quantizes", False)]
        if len(quant) > 1:
            raise RecipeError("a recipe can have at most one quantizing KV press, got "
                              + ", ".join(self.kv[i].name for i in quant))
        # a press whose decode eviction only ever drops full-precision entries (it declares
        # decode_evicts_full_precision_only, e.g. Elastic Cache) composes with a quantizer
        if quant and any(getattr(s, "decode_evicts", False) and getattr(s, "decode", True)
                         and not getattr(s, "decode_evicts_full_precision_only", False) for s in self.kv):
            raise RecipeError("a press that evicts during decoding cannot be combined with a quantizing press "
                              "(quantized groups cannot drop single tokens); set decode=false on it, "
                              "e.g. 'streaming:recent=512,decode=false+kivi:2'")
        if quant and quant[0] != len(self.kv) - 1:
            raise RecipeError(f"the quantizing press {self.kv[quant[0]].name!r} must be the last KV press "
                              "(evict or merge first, then quantize)")
        # a prefill policy that compresses the KV itself (e.g. zipvl's mixed precision) owns the cache
        if self.kv and getattr(self.prefill, "compresses_kv", False):
            raise RecipeError(f"{self.prefill.name} compresses the KV cache itself; to combine it with KV presses "
                              f"({', '.join(s.name for s in self.kv)}) set kv=none on it, e.g. "
                              f"'{self.prefill.name}:kv=none+{self.kv[0].name}'")
        # a mass merge's log-weights (mmkv.cache.mass) travel only into KIVI's segments
        mass = next((i for i, s in enumerate(self.kv) if getattr(s, "merge", None) == "mass"), None)
        if mass is not None:
            if self.prefill is not None:
                raise RecipeError(f"merge='mass' ({self.kv[mass].name}) cannot run with the prefill policy "
                                  f"{self.prefill.name!r}: a layer holding log-weights is attended by mmkv's "
                                  "PyTorch path, not by the policy")
            after = [s.name for s in self.kv[mass + 1:] if s.name != "kivi"]
            if after:
                raise RecipeError(f"after merge='mass' ({self.kv[mass].name}) only kivi can compress the cache "
                                  f"further (its segments carry the log-weights); got {', '.join(after)}")
        # the same stage twice: a second pass of a press re-reads its own output (pvc+pvc reports
        # the first pass's output as "before"; two evictions halve each other's budget), so refuse
        seen: dict[type, Stage] = {}
        for s in self.stages:
            if type(s) in seen:
                raise RecipeError(f"stage {s.name!r} appears twice in the recipe; each stage runs once: give its "
                                  f"parameters once (e.g. '{s.name}:key=value,...') or use another stage")
            seen[type(s)] = s

    @property
    def vision(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "vision"]

    @property
    def prefill_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "prefill"]

    @property
    def prefill(self) -> Stage | None:
        p = self.prefill_stages
        return p[0] if p else None

    @property
    def kv(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "kv"]

    @property
    def empty(self) -> bool:
        return not self.stages

    def spec(self, full: bool = False) -> str:
        """The recipe string of the stages (`Stage.spec`; full=True: every parameter, defaults too)."""
        return "+".join(s.spec(full) for s in self.stages) or "none"

    def __str__(self) -> str:
        return self.name or self.spec()

    @classmethod
    def parse(cls, recipe: "str | Recipe | Stage | list | None") -> "Recipe":
        """A Recipe from a preset name, a recipe string, a Stage, a list of Stages, or None."""
        if recipe is None:
            return cls([], "none")
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Stage):
            return cls([recipe])
        if isinstance(recipe, (list, tuple)):
            return cls([parse_stage(s) if isinstance(s, str) else s for s in recipe])
        if not isinstance(recipe, str):
            raise RecipeError(f"a recipe is a string, a Stage or a list of Stages, got {type(recipe).__name__}")
        _ensure_registered()
        text = recipe.strip()
        if text.lower() in PRESETS:
            spec = PRESETS[text.lower()]
            return cls([parse_stage(s) for s in spec.split("+") if s.strip()], text.lower())
        if not text:
            raise RecipeError(f"empty recipe; use 'none' or one of the presets: {', '.join(sorted(PRESETS))}")
        parts = text.split("+")
        if any(not p.strip() for p in parts):
            raise RecipeError(f"empty stage in recipe {text!r}: a '+' at an end or two in a row; "
                              "for no compression use 'none'")
        return cls([parse_stage(s) for s in parts])


def available() -> dict[str, list[tuple[str, str]]]:
    """{kind: [(stage name, one-line description)]} of every registered stage."""
    _ensure_registered()
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    for n, cls in sorted(STAGES.items()):
        if n == cls.name:
            out[cls.kind].append((n, (cls.__doc__ or "").strip().splitlines()[0]))
    return out


def stage_help(name: str) -> str:
    """What `mmkv info NAME` prints: a preset's expansion, or a stage's description and every
    parameter with its default (the `main` one is what `name:VALUE` sets)."""
    _ensure_registered()
    key = name.strip().lower()
    if key in PRESETS:
        lines = [f"preset {key}: {PRESET_DOCS.get(key, '')}".rstrip(), f"  = {PRESETS[key] or 'none (no stages)'}"]
        for spec in filter(None, (PRESETS[key] or "").split("+")):
            lines.append(f"  (`mmkv info {spec.partition(':')[0]}` for its parameters)")
        return "\n".join(lines)
    if key not in STAGES:
        raise RecipeError(f"unknown stage or preset {name!r}. Stages: {', '.join(sorted(STAGES))}; "
                          f"presets: {', '.join(sorted(PRESETS))}")
    cls = STAGES[key]
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"{cls.name} ({cls.kind} stage){': ' + doc[0] if doc else ''}"]
    if cls.aliases:
        lines.append(f"  aliases: {', '.join(cls.aliases)}")
    lines.append("  parameters (name:key=value,...):")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        main = f"   <- {cls.name}:VALUE sets it" if f.name == cls.main else ""
        lines.append(f"    {f.name:<16} = {default!r}{main}")
    return "\n".join(lines)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None  # required (no default)


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _needs_question(cls: type[Stage]) -> bool:
    """A stage's `needs_question` ClassVar, else its `query_aware` (a property is read off the
    default instance: vidkv needs the question only with stp > 0)."""
    v = getattr(cls, "needs_question", getattr(cls, "query_aware", False))
    if isinstance(v, property):
        try:
            v = v.fget(cls())
        except Exception:  # noqa: BLE001 - a stage without a valid default: assume it does
            v = True
    return bool(v)


def stage_info() -> list[dict]:
    """One dict per registered stage (aliases are not repeated), what `mmkv info --json` prints:
    name, kind ("vision", "prefill" or "kv"), main (the parameter `name:VALUE` sets, or None),
    params ({parameter: default}, JSON values), needs_question (whether the stage cannot run
    before the question is known) and doc (the first line of its docstring)."""
    _ensure_registered()
    out = []
    for n, cls in sorted(STAGES.items()):
        if n != cls.name:
            continue
        out.append({"name": cls.name, "kind": cls.kind, "main": cls.main,
                    "params": {f.name: _jsonable(_default(f)) for f in dataclasses.fields(cls)},
                    "needs_question": _needs_question(cls),
                    "doc": (cls.__doc__ or "").strip().splitlines()[0] if (cls.__doc__ or "").strip() else ""})
    return out
