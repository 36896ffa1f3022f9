"""The stage registry: the `Stage` base class every recipe stage derives from, `register`, and
`check`. It sits at the bottom of the package (it imports nothing from mmkv but the errors), so
method modules import it without importing `recipe.py`, which imports every method for the presets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .errors import RecipeError

STAGES: dict[str, type["Stage"]] = {}
KINDS = ("vision", "prefill", "kv")


@dataclass
class Stage:
    """Base of every recipe stage. Subclasses set `name`, `kind` and optionally `main` (the field a
    bare `name:VALUE` sets) and validate their fields in `validate()`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    main: ClassVar[str | None] = None
    aliases: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise RecipeError on nonsensical parameters. Called on construction."""

    def spec(self, full: bool = False) -> str:
        """The recipe-string form of this stage: `name:MAIN` (the `main` parameter's value, always,
        so "kivi:2" stays "kivi:2" and not a bare "kivi" that depends on today's defaults), then
        `key=value` for every other field that differs from its default. `Recipe.parse` reads it
        back to an equal stage (tuples are written "a/b", None as "none"). full=True writes every
        field, defaults included: what a stored result was computed with, which stays the same
        string only while the stage computes the same thing (`mmkv bench` resumes by it)."""
        def text(v) -> str:
            return "none" if v is None else "/".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)

        parts = [text(getattr(self, self.main))] if self.main else []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if f.name != self.main and (full or v != default):
                parts.append(f"{f.name}={text(v)}")
        return self.name + (":" + ",".join(parts) if parts else "")

    def describe(self) -> str:
        return (self.__doc__ or "").strip().splitlines()[0] if self.__doc__ else self.name


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a Stage available by name (and aliases) in recipe strings."""
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__}.kind must be one of {KINDS}")
    for n in (cls.name, *cls.aliases):
        if n in STAGES and STAGES[n] is not cls:
            raise TypeError(f"stage name {n!r} is already registered by {STAGES[n].__name__}")
        STAGES[n] = cls
    return cls


def check(cond: bool, msg: str) -> None:
    """Raise RecipeError(msg) unless cond: the one-liner stages use to validate parameters."""
    if not cond:
        raise RecipeError(msg)
