"""Register hf-extensions' PEFT methods with PEFT, without touching PEFT's ``PeftType`` enum.

PEFT looks every method up by its ``peft_type``: ``get_peft_model`` finds the tuner class through
``PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]``, ``PeftConfig.from_pretrained`` /
``PeftModel.from_pretrained`` read ``peft_type`` from ``adapter_config.json`` (a plain string)
and look the config class up in ``PEFT_TYPE_TO_CONFIG_MAPPING``, and the state-dict helpers read
``PEFT_TYPE_TO_PREFIX_MAPPING``. ``peft.utils.register_peft_method`` fills those mappings, but
only for a name that is already a member of the closed ``peft.utils.PeftType``. This package owns
its own ``str`` enum instead, :class:`HfExtensionsPeftType`: a ``str``-valued member hashes and
compares as its string, so it is found in PEFT's dicts by the string read from JSON, serialises
to that same string, and has the ``.value`` transformers uses (``peft_type.value.lower()``).
:func:`register_method` places it in PEFT's mappings (config, tuner, prefix; not the mixed-model
one: the methods are not ``PeftMixedModel``-compatible, as ``register_peft_method``'s default).
Checked with peft 0.21.2 (``tests/test_peft_registration.py``, ``tests/test_upstream_internals.py``):
save / load / ``from_pretrained`` of both methods give byte-identical ``adapter_config.json`` and
bit-identical weights, as with the earlier extension of ``PeftType._member_map_``, which this
replaces (it edited a third-party enum's private tables).

**Names.** Every method of this package is registered under a namespaced type,
``HF_EXTENSIONS_<NAME>`` (:data:`NAMESPACE`): it cannot collide with a method PEFT adds later,
and it is what a user sees when loading one of our checkpoints in a process that has not
imported ``peft_configs``.

**Loading without ``import peft_configs``.** PEFT resolves ``peft_type`` before any of our code
can run: ``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``, ``AutoPeftModel*``,
transformers' ``load_adapter`` and ``AutoModel*.from_pretrained(adapter_dir)`` all read
``adapter_config.json`` and index the plain dict ``PEFT_TYPE_TO_CONFIG_MAPPING`` with its
``peft_type``, so such a process can only fail with ``KeyError: 'HF_EXTENSIONS_SHARED_PREFIX'``.
What was checked (peft 0.21.2, transformers 5.25): PEFT reads no entry points and has no hook
or fallback for an unknown type; of ``adapter_config.json`` only the ``peft_type`` string reaches
that error (``auto_mapping`` is read after the config class is found). Making the type string
itself the message (``HF_EXTENSIONS_SHARED_PREFIX__IMPORT_PEFT_CONFIGS``) was rejected: the type
is an identifier that PEFT's ``register_peft_method`` requires to equal the member name and that
transformers' ``delete_adapter`` turns into a state-dict prefix (``peft_type.value.lower()``),
and it would change every saved artifact. Interpreter-start hooks (``.pth`` files) are not used.
So the fix is where a reader looks: every adapter of ours saved with ``save_pretrained`` or
``push_to_hub`` carries a README section saying ``import peft_configs``, with the loading code
(:class:`RegisteredPeftConfig`, :func:`loading_instructions`), and the namespaced key names the
package in the error itself.
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from peft.config import PeftConfig
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)

__all__ = [
    "LOADING_HEADING",
    "NAMESPACE",
    "HfExtensionsPeftType",
    "RegisteredPeftConfig",
    "add_loading_section",
    "hf_extensions_peft_type",
    "loading_instructions",
    "peft_type_name",
    "register_method",
]

#: Prefix of every PEFT type this package registers.
NAMESPACE = "hf_extensions_"
#: Heading of the section that :func:`add_loading_section` adds to a saved adapter's README.md.
LOADING_HEADING = "## Loading this adapter"
#: The "get started" section of the model card template PEFT fills, and its placeholder.
_GET_STARTED = "## How to Get Started with the Model"
_PLACEHOLDER = "[More Information Needed]"
#: Where the package comes from (what ``pip install`` needs before ``import peft_configs``).
INSTALL_SPEC = "hf-extensions @ git+https://github.com/hf-extensions/hf-extensions"
#: transformers' auto class of each PEFT ``task_type`` (the base model a snippet loads).
_AUTO_CLASS_OF_TASK = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def peft_type_name(name: str) -> str:
    """The ``PeftType`` member name (and value) of our method ``name``: ``HF_EXTENSIONS_NAME``."""
    return (name if name.startswith(NAMESPACE) else NAMESPACE + name).upper()


class HfExtensionsPeftType(str, enum.Enum):
    """The PEFT types of this package's methods (``peft_type`` in ``adapter_config.json``).

    A ``str`` enum like ``peft.utils.PeftType``: each member equals and hashes as its value, so
    PEFT's ``PEFT_TYPE_TO_*`` dicts find it by the string they read from JSON. Add a member here
    for a new method (its name is :func:`peft_type_name` of the method's short name).
    """

    HF_EXTENSIONS_SHARED_PREFIX = "HF_EXTENSIONS_SHARED_PREFIX"
    HF_EXTENSIONS_PROMPT_POOL = "HF_EXTENSIONS_PROMPT_POOL"


def hf_extensions_peft_type(name: str) -> HfExtensionsPeftType:
    """The :class:`HfExtensionsPeftType` member of our method ``name`` (``"shared_prefix"``)."""
    member = HfExtensionsPeftType.__members__.get(peft_type_name(name))
    if member is None:
        raise ValueError(
            f"no PEFT type {peft_type_name(name)!r} for method name {name!r}; add it to "
            f"peft_configs.registration.HfExtensionsPeftType (have "
            f"{sorted(HfExtensionsPeftType.__members__)})"
        )
    return member


def loading_instructions(
    peft_type: str,
    *,
    base_model: str | None = None,
    task_type: str | None = None,
    base_model_class: str | None = None,
    parent_library: str | None = None,
    adapter: str = "<this repository or folder>",
) -> str:
    """The README section telling a reader how to load an adapter of ``peft_type``.

    The snippet loads the base model with the class PEFT recorded (``auto_mapping``, for an
    adapter saved without ``task_type``), or with transformers' auto class of ``task_type``, from
    ``base_model`` (the config's ``base_model_name_or_path``); ``adapter`` is where the adapter is.
    """
    if base_model_class and parent_library:
        library = parent_library.split(".")[0]
        module = library if library in ("transformers", "diffusers") else parent_library
        base_class = base_model_class
    else:
        module, base_class = "transformers", _AUTO_CLASS_OF_TASK.get(str(task_type), "AutoModel")
    source = json.dumps(base_model or "<the base model's id or folder>")
    return (
        f"{LOADING_HEADING}\n\n"
        f"This adapter uses a PEFT method of hf-extensions (`peft_type: {peft_type}`), which PEFT "
        f"knows only after `import peft_configs`. Without that import, `PeftModel.from_pretrained` "
        f"fails with `KeyError: '{peft_type}'`.\n\n"
        "```python\n"
        f'# pip install "{INSTALL_SPEC}"\n'
        f"import peft_configs  # registers {peft_type} with PEFT\n"
        "from peft import PeftModel\n"
        f"from {module} import {base_class}\n\n"
        f"base = {base_class}.from_pretrained({source})\n"
        f"model = PeftModel.from_pretrained(base, {json.dumps(adapter)})\n"
        "```\n"
    )


def add_loading_section(save_directory: str | os.PathLike, section: str) -> Path | None:
    """Append ``section`` to ``save_directory/README.md`` unless it already says how to load.

    PEFT writes that README (its model card) before the adapter's config; a card that already
    has :data:`LOADING_HEADING` or an ``import peft_configs`` line (a recipe's own card) is left
    as it is. The file is replaced atomically. Returns the README's path, or ``None`` when there
    is no README (a config saved on its own).
    """
    path = Path(save_directory) / "README.md"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if LOADING_HEADING in text or "import peft_configs" in text:
        return path
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".README.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(_with_section(text, section))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _with_section(text: str, section: str) -> str:
    """``text`` with ``section`` in place of the "get started" placeholder of PEFT's card
    template (``huggingface_hub``'s), or at the end when there is no such placeholder."""
    lines = text.split("\n")
    if _GET_STARTED in lines:
        start = lines.index(_GET_STARTED)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines)
        )
        if any(line.strip() == _PLACEHOLDER for line in lines[start:end]):
            return "\n".join([*lines[:start], section, *lines[end:]])
    return text.rstrip("\n") + "\n\n" + section


class RegisteredPeftConfig(PeftConfig):
    """Base of the configs of every PEFT method this package registers.

    ``save_pretrained`` writes ``adapter_config.json`` as PEFT does, then adds to the adapter's
    README.md (PEFT's model card, written just before by ``PeftModel.save_pretrained`` and so by
    ``push_to_hub``) the section of :func:`loading_instructions`: a process that has not run
    ``import peft_configs`` cannot load the adapter, and PEFT's error cannot say so.
    """

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        auto_mapping = kwargs.get("auto_mapping_dict") or {}
        super().save_pretrained(save_directory, **kwargs)
        peft_type = getattr(self.peft_type, "value", self.peft_type)
        section = loading_instructions(
            str(peft_type),
            base_model=self.base_model_name_or_path,
            task_type=getattr(self.task_type, "value", self.task_type),
            base_model_class=auto_mapping.get("base_model_class"),
            parent_library=auto_mapping.get("parent_library"),
        )
        add_loading_section(save_directory, section)


def register_method(
    name: str, config_cls: type[PeftConfig], model_cls: type
) -> HfExtensionsPeftType:
    """Make ``name`` a PEFT method: put its type in PEFT's config, tuner and prefix mappings.

    ``name`` is the short lower-case name (``"shared_prefix"``); the PEFT type is the
    :class:`HfExtensionsPeftType` member ``HF_EXTENSIONS_SHARED_PREFIX`` and the state-dict
    prefix ``model_cls.prefix``, which must be ``name + "_"``. Idempotent (a second import or a
    module reload points the mappings at the new classes), but refuses to register the name for
    classes of another name, or a prefix another method already uses. Returns the member.
    """
    if name != name.lower() or name.endswith("_"):
        raise ValueError(f"PEFT method names are lower case without a trailing '_', got {name!r}.")
    if not issubclass(config_cls, RegisteredPeftConfig):
        raise TypeError(
            f"{config_cls.__name__} must derive from peft_configs.registration."
            "RegisteredPeftConfig, so that its saved adapters say how to load them."
        )
    prefix = f"{name}_"
    if getattr(model_cls, "prefix", None) != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix must be {prefix!r}.")
    peft_type = hf_extensions_peft_type(name)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None and (registered.__module__, registered.__qualname__) != (
        config_cls.__module__,
        config_cls.__qualname__,
    ):
        raise ValueError(
            f"PEFT type {peft_type.value} is already registered with "
            f"{registered.__module__}.{registered.__qualname__}."
        )
    clash = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != peft_type]
    if clash:
        raise ValueError(f"the state-dict prefix {prefix!r} is already PEFT type {clash[0]}'s.")
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    return peft_type
