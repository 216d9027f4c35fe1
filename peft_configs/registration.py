"""Register hf-extensions' PEFT methods with PEFT: the one place that extends PEFT's closed enum.

PEFT looks every method up by its ``PeftType``: ``get_peft_model`` finds the tuner class through
``PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]``, and ``PeftConfig.from_pretrained`` /
``PeftModel.from_pretrained`` read ``peft_type`` from ``adapter_config.json`` and look the config
class up in ``PEFT_TYPE_TO_CONFIG_MAPPING``. ``peft.utils.register_peft_method`` fills those
mappings, but only for a name that is already a member of ``peft.utils.PeftType``, and that enum
is closed (a plain ``enum.Enum``: no public way to add a member). :func:`extend_peft_type` adds
one member the way ``enum`` itself does when it builds a class (the member object, then
``_member_names_``, ``_member_map_`` and ``_value2member_map_``), so that ``PeftType.NAME``,
``PeftType[NAME]``, ``PeftType(value)``, iteration and ``in`` all see it; everything else is
PEFT's own ``register_peft_method``. ``tests/test_peft_registration.py`` fails loudly if PEFT or
Python change any of the assumptions made here.

**Names.** Every method of this package is registered under a namespaced type,
``HF_EXTENSIONS_<NAME>`` (:data:`NAMESPACE`): it cannot collide with a method PEFT adds later,
and it is what a user sees when loading one of our checkpoints in a process that has not
imported ``peft_configs``. PEFT resolves ``peft_type`` before any of our code can run, so that
failure can only be PEFT's ``KeyError: 'HF_EXTENSIONS_SHARED_PREFIX'``; the namespaced key at
least names the missing package. (``register_peft_method`` requires an enum value equal to its
name, so the value cannot carry a longer message.)
"""

from __future__ import annotations

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

__all__ = ["NAMESPACE", "extend_peft_type", "peft_type_name", "register_method"]

#: Prefix of every PEFT type this package registers.
NAMESPACE = "hf_extensions_"


def peft_type_name(name: str) -> str:
    """The ``PeftType`` member name (and value) of our method ``name``: ``HF_EXTENSIONS_NAME``."""
    return (name if name.startswith(NAMESPACE) else NAMESPACE + name).upper()


def extend_peft_type(name: str) -> PeftType:
    """Add ``HF_EXTENSIONS_<NAME>`` to ``peft.utils.PeftType`` and return the member; idempotent.

    Raises ``TypeError`` if ``PeftType`` is no longer a ``str``-valued ``Enum`` with the standard
    member tables (the extension below would then be wrong: update it for that PEFT).
    """
    member_name = peft_type_name(name)
    existing = PeftType.__members__.get(member_name)
    if existing is not None:
        return existing
    # `in vars(PeftType)`, not hasattr: enum.Enum itself has empty tables that hasattr would find
    # (and this would then write members into every enum's shared tables).
    if PeftType._member_type_ is not str or not all(
        attribute in vars(PeftType)
        for attribute in ("_member_names_", "_member_map_", "_value2member_map_")
    ):
        raise TypeError(
            "peft.utils.PeftType is no longer a str-valued enum.Enum with the standard member "
            "tables; peft_configs.registration.extend_peft_type must be updated for this PEFT."
        )
    # What enum does for every member while building the class (enum._proto_member.__set_name__).
    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # EnumType.__setattr__ refuses to re-assign a name of _member_map_: set the attribute first.
    setattr(PeftType, member_name, member)
    PeftType._member_names_.append(member_name)
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    return member


def register_method(name: str, config_cls: type[PeftConfig], model_cls: type) -> PeftType:
    """Make ``name`` a PEFT method: extend ``PeftType``, then PEFT's ``register_peft_method``.

    ``name`` is the short lower-case name (``"shared_prefix"``); the PEFT type is
    ``HF_EXTENSIONS_SHARED_PREFIX`` and the state-dict prefix ``model_cls.prefix``, which must be
    ``name + "_"``. Idempotent (a second import or a module reload registers nothing twice), but
    refuses to register the name for classes of another name. Returns the ``PeftType`` member.
    """
    if name != name.lower() or name.endswith("_"):
        raise ValueError(f"PEFT method names are lower case without a trailing '_', got {name!r}.")
    prefix = f"{name}_"
    if getattr(model_cls, "prefix", None) != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix must be {prefix!r}.")
    peft_type = extend_peft_type(name)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None:
        if (registered.__module__, registered.__qualname__) != (
            config_cls.__module__,
            config_cls.__qualname__,
        ):
            raise ValueError(
                f"PEFT type {peft_type.value} is already registered with "
                f"{registered.__module__}.{registered.__qualname__}."
            )
        # A reloaded module: point the mappings at the new classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        return peft_type
    register_peft_method(
        name=peft_type.value.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix
    )
    return peft_type
