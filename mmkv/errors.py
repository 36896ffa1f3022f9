"""Errors raised by mmkv. Every one names the problem and what to do about it."""


class MmkvError(Exception):
    """Base class of every error mmkv raises on purpose (bad input, bad recipe, unsupported model)."""


class InputError(MmkvError, ValueError):
    """The video, image, frames or question cannot be used (missing, unreadable, empty, wrong type)."""


class RecipeError(MmkvError, ValueError):
    """A recipe string, stage name or budget is invalid."""


class ModelError(MmkvError, ValueError):
    """The model cannot be loaded or its family is not supported."""


class MmkvWarning(UserWarning):
    """Something mmkv worked around but you should know (a truncated video, a prompt past the
    model's trained length). The CLI prints each as one `mmkv: warning:` line on stderr."""
