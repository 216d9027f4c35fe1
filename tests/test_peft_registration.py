"""Registration of hf-extensions' PEFT methods with PEFT (peft_configs.registration).

The package's own ``str`` enum (:class:`HfExtensionsPeftType`) in PEFT's mappings: PEFT's
``PeftType`` is left untouched, the members act as PEFT's string keys, and saving / loading is
byte-identical to what the earlier ``PeftType`` extension wrote. If PEFT changes where it looks
methods up, one of these fails and says what to change.
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
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType, register_peft_method
from transformers import BertForSequenceClassification

import peft_configs
from hf_extensions.models import tiny_bert_classifier
from peft_configs.registration import (
    LOADING_HEADING,
    NAMESPACE,
    HfExtensionsPeftType,
    add_loading_section,
    hf_extensions_peft_type,
    loading_instructions,
    peft_type_name,
    register_method,
)
from peft_configs.shared_prefix import SharedPrefixModel, SharedPrefixTuningConfig

TYPE = "HF_EXTENSIONS_SHARED_PREFIX"
MEMBER = HfExtensionsPeftType.HF_EXTENSIONS_SHARED_PREFIX


def test_peft_type_enum_is_left_untouched():
    # The earlier registration added members to PeftType's private tables; nothing does now.
    assert not [name for name in PeftType.__members__ if name.startswith("HF_EXTENSIONS")]
    assert TYPE not in PeftType._value2member_map_


def test_register_peft_method_still_requires_an_enum_member():
    # Why register_method fills PEFT's mappings itself: PEFT refuses a name outside PeftType.
    class Config(PeftConfig):
        pass

    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(
            name="hf_extensions_never_registered", config_cls=Config, model_cls=object
        )


def test_our_members_act_as_peft_string_keys():
    assert issubclass(HfExtensionsPeftType, str) and issubclass(HfExtensionsPeftType, enum.Enum)
    assert MEMBER.name == MEMBER.value == TYPE
    assert MEMBER == TYPE and hash(MEMBER) == hash(TYPE)  # str-keyed mapping lookups work
    assert json.dumps({"peft_type": MEMBER}) == json.dumps({"peft_type": TYPE})
    assert MEMBER.value.lower() == "hf_extensions_shared_prefix"  # transformers' delete_adapter
    assert hf_extensions_peft_type("shared_prefix") is MEMBER
    assert peft_type_name("shared_prefix") == TYPE and TYPE.lower().startswith(NAMESPACE)
    with pytest.raises(ValueError, match=r"add it to peft_configs\.registration"):
        hf_extensions_peft_type("never_registered")


def test_import_registers_config_tuner_and_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[TYPE] is SharedPrefixTuningConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[TYPE] is SharedPrefixModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[MEMBER] == "shared_prefix_"
    assert TYPE not in PEFT_TYPE_TO_MIXED_MODEL_MAPPING  # not PeftMixedModel-compatible
    assert SharedPrefixTuningConfig().peft_type is MEMBER
    assert peft_configs.SharedPrefixTuningConfig is SharedPrefixTuningConfig


def test_registration_is_idempotent_and_refuses_a_different_class():
    assert register_method("shared_prefix", SharedPrefixTuningConfig, SharedPrefixModel) is MEMBER

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


def _python_block(text: str) -> str:
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_saved_adapter_says_how_to_load_it_and_that_code_runs_in_a_fresh_process(tmp_path):
    # PEFT fails with a bare KeyError in a process that has not imported peft_configs, and
    # nothing of ours can run before that lookup: the adapter's README must say so.
    tiny_bert_classifier().save_pretrained(tmp_path / "base")
    base = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, SharedPrefixTuningConfig(num_virtual_tokens=2))
    model.save_pretrained(tmp_path / "adapter")
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert readme.count(LOADING_HEADING) == 1 and f"KeyError: '{TYPE}'" in readme
    # It fills the "get started" section of PEFT's card template instead of its placeholder.
    started = readme.split(LOADING_HEADING, 1)[1].split("\n## ", 1)[0]
    assert "[More Information Needed]" not in started
    snippet = _python_block(readme.split(LOADING_HEADING, 1)[1])
    assert "import peft_configs" in snippet and str(tmp_path / "base") in snippet
    snippet = snippet.replace("<this repository or folder>", str(tmp_path / "adapter"))
    snippet += "print(type(model.peft_config['default']).__name__)\n"
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("SharedPrefixTuningConfig")


def test_the_loading_section_is_written_once_and_a_card_of_ours_is_kept(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), SharedPrefixTuningConfig(num_virtual_tokens=2))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # re-saving does not add a second section
    assert (tmp_path / "README.md").read_text().count(LOADING_HEADING) == 1
    card = "---\nlibrary_name: peft\n---\n\nimport peft_configs first, then load.\n"
    (tmp_path / "README.md").write_text(card)
    model.save_pretrained(tmp_path)  # PEFT updates the card's metadata; our text stays alone
    text = (tmp_path / "README.md").read_text()
    assert LOADING_HEADING not in text and "import peft_configs first" in text
    assert add_loading_section(tmp_path / "missing", "x") is None  # a config saved on its own


def test_the_snippet_loads_the_base_model_with_the_right_class():
    section = loading_instructions(
        "HF_EXTENSIONS_PROMPT_POOL", base_model="org/model", task_type="SEQ_CLS"
    )
    assert "from transformers import AutoModelForSequenceClassification" in section
    assert 'AutoModelForSequenceClassification.from_pretrained("org/model")' in section
    section = loading_instructions(
        TYPE,
        base_model_class="ViTForImageClassification",
        parent_library="transformers.models.vit.modeling_vit",
    )
    assert "from transformers import ViTForImageClassification" in section


def test_a_registered_method_must_use_the_config_base_that_writes_the_section():
    class Plain(PeftConfig):
        pass

    with pytest.raises(TypeError, match="RegisteredPeftConfig"):
        register_method("plain_probe", Plain, SharedPrefixModel)
