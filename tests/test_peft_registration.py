"""Registration of hf-extensions' PEFT methods with PEFT (peft_configs.registration).

These tests pin the assumptions the one enum-extension helper makes about PEFT and Python: if PEFT
opens its enum, changes ``register_peft_method`` or the way configs are looked up, one of them
fails and says what to change.
"""

from __future__ import annotations

import enum
import json
import subprocess
import sys
import textwrap

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType, register_peft_method

import peft_configs
from hf_extensions.models import tiny_bert_classifier
from peft_configs.registration import (
    NAMESPACE,
    extend_peft_type,
    peft_type_name,
    register_method,
)
from peft_configs.shared_prefix import SharedPrefixModel, SharedPrefixTuningConfig

TYPE = "HF_EXTENSIONS_SHARED_PREFIX"


def test_peft_type_is_still_a_closed_str_enum():
    # The helper mirrors enum's own member creation; it is only valid for a str-valued Enum with
    # the standard member tables. If PEFT makes PeftType open (or not an Enum), drop the helper.
    assert issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)
    assert PeftType._member_type_ is str
    for table in ("_member_names_", "_member_map_", "_value2member_map_"):
        assert hasattr(PeftType, table), table


def test_register_peft_method_still_requires_an_enum_member():
    # What makes the helper necessary: PEFT refuses a name that is not a PeftType member.
    class Config(PeftConfig):
        pass

    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(
            name="hf_extensions_never_registered", config_cls=Config, model_cls=object
        )


def test_the_new_member_behaves_like_a_native_one():
    member = PeftType.HF_EXTENSIONS_SHARED_PREFIX
    native = PeftType.LORA
    assert type(member) is type(native) is PeftType
    assert member.name == member.value == TYPE
    assert PeftType(TYPE) is member and PeftType[TYPE] is member
    assert member in list(PeftType) and TYPE in PeftType.__members__
    assert member == TYPE and hash(member) == hash(TYPE)  # str-keyed mapping lookups work
    assert json.dumps({"peft_type": member}) == json.dumps({"peft_type": TYPE})
    assert extend_peft_type("shared_prefix") is member  # idempotent
    assert peft_type_name("shared_prefix") == TYPE and TYPE.lower().startswith(NAMESPACE)


def test_import_registers_config_tuner_and_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[TYPE] is SharedPrefixTuningConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[TYPE] is SharedPrefixModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.HF_EXTENSIONS_SHARED_PREFIX] == "shared_prefix_"
    assert SharedPrefixTuningConfig().peft_type is PeftType.HF_EXTENSIONS_SHARED_PREFIX
    assert peft_configs.SharedPrefixTuningConfig is SharedPrefixTuningConfig


def test_registration_is_idempotent_and_refuses_a_different_class():
    assert register_method("shared_prefix", SharedPrefixTuningConfig, SharedPrefixModel) is (
        PeftType.HF_EXTENSIONS_SHARED_PREFIX
    )

    class Impostor(SharedPrefixTuningConfig):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("shared_prefix", Impostor, SharedPrefixModel)
    with pytest.raises(ValueError, match="lower case"):
        register_method("Shared_Prefix", SharedPrefixTuningConfig, SharedPrefixModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[TYPE] is SharedPrefixTuningConfig


def test_checkpoint_loads_in_a_fresh_process_only_after_import(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), SharedPrefixTuningConfig(num_virtual_tokens=2))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == TYPE
    script = textwrap.dedent(
        f"""
        from peft import PeftConfig
        try:
            PeftConfig.from_pretrained({str(tmp_path)!r})
        except KeyError as error:
            print("WITHOUT:", error)
        import peft_configs
        print("WITH:", type(PeftConfig.from_pretrained({str(tmp_path)!r})).__name__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    # Without the package PEFT can only fail on the type; the namespaced type names the package.
    assert f"WITHOUT: '{TYPE}'" in result.stdout
    assert "WITH: SharedPrefixTuningConfig" in result.stdout


def test_checkpoint_of_another_layout_version_is_refused(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), SharedPrefixTuningConfig(num_virtual_tokens=2))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["format_version"] = 2
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version"):
        PeftConfig.from_pretrained(tmp_path)
