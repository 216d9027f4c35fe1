"""``Args:`` blocks for configs, written from the fields' own ``help`` metadata.

A config's fields carry ``metadata={"help": ...}`` (what ``HfArgumentParser`` prints for
``--help``, as in TRL). :func:`document_fields` appends to the class docstring an ``Args:`` block
with every field the project defines (those of upstream bases such as ``TrainingArguments`` or
``PeftConfig`` are documented upstream), its type, default and help, so ``help(SAMConfig)`` and
IDEs show them without a second copy of the text to keep in sync.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import TypeVar

__all__ = ["OUR_PACKAGES", "document_fields", "documented_fields"]

#: Top-level packages whose config fields are documented here.
OUR_PACKAGES = ("hf_extensions", "trainers", "peft_configs", "recipes")

T = TypeVar("T", bound=type)


def documented_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields of ``cls`` that a class of ours declares, base classes first."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        if klass.__module__.split(".")[0] not in OUR_PACKAGES:
            continue
        for name in vars(klass).get("__annotations__", {}):
            if name in fields and name not in names:
                names.append(name)
    return [fields[name] for name in names]


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    return "required"


def document_fields(cls: T) -> T:
    """Class decorator (outside ``@dataclass``): append the ``Args:`` block to ``cls.__doc__``."""
    lines = ["Args:"]
    for field in documented_fields(cls):
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        lines.append(f"    {field.name} (`{kind}`, defaults to `{_default(field)}`):")
        help_text = " ".join(str(field.metadata.get("help", "")).split()) or "(no help text)"
        lines += textwrap.wrap(help_text, 96, initial_indent=" " * 8, subsequent_indent=" " * 8)
    body = textwrap.dedent(cls.__doc__ or "").rstrip()
    cls.__doc__ = f"{body}\n\n" + "\n".join(lines) + "\n"
    return cls
