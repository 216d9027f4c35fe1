"""Private and undocumented upstream internals that shipped code relies on, pinned one by one.

transformers, peft, diffusers, accelerate and huggingface_hub move their internals between
releases without deprecation. Every internal hf-extensions uses (a private attribute, an
underscore method it overrides or calls, a helper imported from a non-public module, a rule or a
layout it reproduces) has a test here that checks exactly the contract our code relies on. A
failure says, in one line: the package and its installed version, what changed, which of our
files relies on the internal, and what to do. All tests are offline and fast (tiny models, no
training, no downloads), so the release that moves an internal is caught by the first test run.

The message format lives in one place: :class:`Internal` (see :meth:`Internal.message`),
raised through :func:`expect` and :func:`upstream`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import inspect
import math
import platform
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import datasets
import huggingface_hub.hf_api as hf_api_module
import huggingface_hub.repocard as repocard_module
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from peft import LoraConfig, PeftConfig, PrefixTuningConfig, get_peft_model
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import (
    AutoConfig,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    AutoQuantizationConfig,
)
from transformers.quantizers.base import HfQuantizer

from hf_extensions.models import (
    tiny_bert_classifier,
    tiny_clip,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
    tiny_vit_classifier,
)
from hf_extensions.pga.clip_prompts import (
    _eos_positions,
    _projected,
    encode_text_embeddings,
)
from hf_extensions.quantization import (
    QUANT_METHOD,
    MetaAugConfig,
    MetaAugHfQuantizer,
    QuantLinear,
)
from hf_extensions.schedulers import S2NGeneralizedScheduler
from hf_extensions.schedulers.snr import BETA_SCHEDULES, make_betas
from peft_configs import (
    PromptPoolConfig,
    PromptPoolModel,
    SharedPrefixModel,
    SharedPrefixTuningConfig,
    registration,
)
from peft_configs.injection import (
    PREFIX_ATTENTION,
    attach_prefix_sites,
    find_self_attention_modules,
    prefix_attention_forward,
)
from peft_configs.prompt_pool.selection import block_input, transformer_blocks
from peft_configs.shared_prefix import SharedPrefixLayer
from trainers.perturbation_trainer import PerturbationTrainer

# ----------------------------------------------------------------------------- the message


def _version(package: str) -> str:
    if package == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


@dataclasses.dataclass(frozen=True)
class Internal:
    """One upstream internal: the package, the internal, our file(s) using it, what to do."""

    package: str  #: distribution name (``importlib.metadata``), or ``"python"``
    name: str  #: the internal, as our code uses it
    ours: str  #: our file(s) (and function) relying on it
    fix: str  #: what to change on our side when it moves

    def message(self, change: str) -> str:
        return (
            f"{self.package} {_version(self.package)}: {change}. "
            f"{self.ours} relies on `{self.name}`. Fix: {self.fix}"
        )


def expect(condition: object, internal: Internal, change: str) -> None:
    """Fail with ``internal``'s message unless ``condition`` holds."""
    if not condition:
        pytest.fail(internal.message(change), pytrace=False)


@contextlib.contextmanager
def upstream(internal: Internal, change: str) -> Iterator[None]:
    """An exception raised in the block becomes ``internal``'s message (with the error)."""
    try:
        yield
    except pytest.fail.Exception:
        raise
    except Exception as error:
        pytest.fail(internal.message(f"{change} ({type(error).__name__}: {error})"), pytrace=False)


def _parameters(function: Callable) -> tuple[str, ...]:
    """Names of the named parameters of ``function``, without ``self`` / ``cls``."""
    names = [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return tuple(names[1:] if names[:1] in (["self"], ["cls"]) else names)


def _takes_var_keyword(function: Callable) -> bool:
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(function).parameters.values()
    )


# ============================================================================= peft: mappings


@pytest.mark.parametrize(
    "short, config_cls, model_cls",
    [
        ("shared_prefix", SharedPrefixTuningConfig, SharedPrefixModel),
        ("prompt_pool", PromptPoolConfig, PromptPoolModel),
    ],
)
def test_registered_peft_types_round_trip_through_peft(short, config_cls, model_cls, tmp_path):
    internal = Internal(
        "peft",
        "PEFT_TYPE_TO_CONFIG_MAPPING / PEFT_TYPE_TO_TUNER_MAPPING / PEFT_TYPE_TO_PREFIX_MAPPING "
        "(peft.mapping) keyed by str-valued types",
        "peft_configs/registration.py (HfExtensionsPeftType, register_method)",
        "follow where PEFT now looks configs and tuners up (PeftConfig.from_pretrained, "
        "get_peft_model) and register there",
    )
    member = registration.hf_extensions_peft_type(short)
    expect(
        PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is config_cls
        and PEFT_TYPE_TO_TUNER_MAPPING.get(member) is model_cls
        and PEFT_TYPE_TO_PREFIX_MAPPING.get(member) == f"{short}_",
        internal,
        "peft.mapping's PEFT_TYPE_TO_* dicts do not hold the registered type",
    )
    config = config_cls(**({"pool_size": 2, "top_k": 1} if short == "prompt_pool" else {}))
    with upstream(internal, "PeftConfig.from_pretrained of a saved adapter_config.json failed"):
        config.save_pretrained(str(tmp_path))
        loaded = PeftConfig.from_pretrained(str(tmp_path))
    expect(
        type(loaded) is config_cls and loaded.peft_type is member,
        internal,
        f"PeftConfig.from_pretrained gave {type(loaded).__name__}: it no longer resolves "
        "peft_type through PEFT_TYPE_TO_CONFIG_MAPPING",
    )
    with upstream(internal, "get_peft_model with a registered config failed"):
        model = get_peft_model(tiny_bert_classifier(), config)
    expect(
        type(model.base_model) is model_cls,
        internal,
        f"get_peft_model built {type(model.base_model).__name__}: it no longer resolves the "
        "tuner through PEFT_TYPE_TO_TUNER_MAPPING",
    )


# ============================================================================= peft: tuner API

PEFT_TUNERS = (
    "peft_configs/shared_prefix/model.py (SharedPrefixModel), "
    "peft_configs/prompt_pool/model.py (PromptPoolModel)"
)

#: hook -> (the parameters our tuners declare / pass, the operation through which PEFT calls it)
TUNER_HOOKS = {
    "_pre_injection_hook": (("model", "config", "adapter_name"), "get_peft_model"),
    "_prepare_adapter_config": (("peft_config", "model_config"), "get_peft_model"),
    "_prepare_model": (("peft_config", "model"), "get_peft_model"),
    "_check_target_module_exists": (("peft_config", "key"), "get_peft_model"),
    "_create_and_replace": (
        (
            "peft_config",
            "adapter_name",
            "target",
            "target_name",
            "parent",
            "current_key",
            "parameter_name",
        ),
        "get_peft_model",
    ),
    "_mark_only_adapters_as_trainable": (("model",), "get_peft_model"),
    "_post_injection_hook": (("model", "config", "adapter_name"), "get_peft_model"),
    "_cast_adapter_dtype": (("adapter_name", "autocast_adapter_dtype"), "get_peft_model"),
    "_enable_adapter_layers": (("enabled",), "PeftModel.disable_adapter()"),
    "_unload_and_optionally_merge": (
        ("merge", "progressbar", "safe_merge", "adapter_names"),
        "PeftModel.unload()",
    ),
}


@pytest.fixture(scope="module")
def tuner_hook_calls() -> tuple[set[str], str | None]:
    """The hooks PEFT calls on SharedPrefixModel through its public API, and the error if any."""
    calls: set[str] = set()
    error = None
    originals = {hook: SharedPrefixModel.__dict__[hook] for hook in TUNER_HOOKS}

    def spy(hook, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            calls.add(hook)
            return function(*args, **kwargs)

        return wrapper

    try:
        for hook, function in originals.items():
            setattr(SharedPrefixModel, hook, spy(hook, function))
        model = get_peft_model(
            tiny_bert_classifier(), SharedPrefixTuningConfig(num_virtual_tokens=2)
        )
        with model.disable_adapter():
            pass
        model.unload()
    except Exception as exception:  # reported by each test, with the hook it concerns
        error = f"{type(exception).__name__}: {exception}"
    finally:
        for hook, function in originals.items():
            setattr(SharedPrefixModel, hook, function)
    return calls, error


@pytest.mark.parametrize("hook", TUNER_HOOKS)
def test_base_tuner_hook_exists_is_called_and_keeps_its_parameters(hook, tuner_hook_calls):
    parameters, operation = TUNER_HOOKS[hook]
    internal = Internal(
        "peft",
        f"BaseTuner.{hook}{parameters}",
        PEFT_TUNERS,
        f"move our override of {hook} to the hook PEFT now calls during {operation}",
    )
    upstream_hook = getattr(BaseTuner, hook, None)
    expect(callable(upstream_hook), internal, f"peft's BaseTuner no longer defines {hook}")
    found = _parameters(upstream_hook)
    expect(found == parameters, internal, f"BaseTuner.{hook} now takes {found}")
    calls, error = tuner_hook_calls
    expect(
        error is None,
        internal,
        f"get_peft_model / disable_adapter / unload of a SharedPrefixModel raised ({error})",
    )
    expect(
        hook in calls,
        internal,
        f"{operation} no longer calls {hook} on the tuner (our override is dead code)",
    )


def test_base_tuner_replace_module_is_still_called_positionally():
    internal = Internal(
        "peft",
        "BaseTuner._replace_module(parent, child_name, new_module, child)",
        PEFT_TUNERS + " (_create_and_replace)",
        "call the new replacement helper from our _create_and_replace",
    )
    function = getattr(BaseTuner, "_replace_module", None)
    expect(callable(function), internal, "BaseTuner no longer has _replace_module")
    found = _parameters(function)
    expect(len(found) == 4, internal, f"BaseTuner._replace_module now takes {found}")


@pytest.mark.parametrize(
    "attribute", ["prefix", "tuner_layer_cls", "target_module_mapping", "uses_shared_state"]
)
def test_base_tuner_class_attributes(attribute):
    internal = Internal(
        "peft",
        f"BaseTuner.{attribute} (class attribute set by our tuners)",
        PEFT_TUNERS,
        "set the class attribute PEFT now reads instead",
    )
    declared = attribute in getattr(BaseTuner, "__annotations__", {}) or hasattr(
        BaseTuner, attribute
    )
    expect(declared, internal, f"BaseTuner no longer declares {attribute}")


@pytest.mark.parametrize(
    "attribute",
    ["_active_adapter", "adapter_layer_names", "other_param_names", "_all_available_adapter_names"],
)
def test_base_tuner_layer_internals(attribute):
    internal = Internal(
        "peft",
        f"BaseTunerLayer.{attribute}",
        "peft_configs/shared_prefix/layer.py (SharedPrefixLayer), "
        "peft_configs/prompt_pool/layer.py (PromptPoolLayer)",
        "set / override what BaseTunerLayer now uses instead",
    )
    try:
        inspect.getattr_static(BaseTunerLayer, attribute)
    except AttributeError:
        expect(False, internal, f"BaseTunerLayer no longer has {attribute}")
    if attribute == "_active_adapter":
        layer = SharedPrefixLayer.__new__(SharedPrefixLayer)
        layer.__dict__["_active_adapter"] = ["probe"]
        expect(
            layer.active_adapters == ["probe"],
            internal,
            "BaseTunerLayer.active_adapters no longer reads _active_adapter",
        )


class _TwoLayers(nn.Module):
    """A backbone layer and a head: PEFT's tuner-independent wrappers without transformers."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.body(x))


def test_modules_to_save_wrapper_holds_the_head_by_adapter_name():
    internal = Internal(
        "peft",
        "ModulesToSaveWrapper.modules_to_save (nn.ModuleDict adapter name -> module copy)",
        "trainers/hierarchical_cl_trainer.py (HierarchicalPromptCLTrainer._head)",
        "read the active copy of the head through the wrapper's new API",
    )
    config = LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"])
    with upstream(internal, "get_peft_model with modules_to_save raised"):
        model = get_peft_model(_TwoLayers(), config)
    head = model.get_base_model().classifier
    copies = getattr(head, "modules_to_save", None)
    expect(
        isinstance(copies, nn.ModuleDict) and list(copies) == ["default"],
        internal,
        f"the wrapped head's modules_to_save is {type(copies).__name__}, not a ModuleDict "
        "keyed by adapter name",
    )
    expect(
        isinstance(copies["default"], nn.Linear),
        internal,
        "the head's trainable copy is not the wrapped nn.Linear",
    )


def test_lora_layer_reset_lora_parameters():
    internal = Internal(
        "peft",
        "LoraLayer.lora_A / lora_B (ModuleDicts by adapter) and "
        "LoraLayer.reset_lora_parameters(adapter_name, init_lora_weights)",
        "hf_extensions/fhbi/particles.py (_reinitialise)",
        "re-draw the particles' LoRA weights with PEFT's new initialiser API",
    )
    with upstream(internal, "get_peft_model with LoRA raised"):
        model = get_peft_model(_TwoLayers(), LoraConfig(r=2, target_modules=["body"]))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    expect(
        isinstance(getattr(layer, "lora_A", None), nn.ModuleDict) and "default" in layer.lora_A,
        internal,
        "LoraLayer.lora_A is no longer a ModuleDict keyed by adapter name",
    )
    found = _parameters(LoraLayer.reset_lora_parameters)
    expect(
        found[:2] == ("adapter_name", "init_lora_weights"),
        internal,
        f"reset_lora_parameters now takes {found}",
    )
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1.0)
    before = layer.lora_A["default"].weight.detach().clone()
    with upstream(internal, "reset_lora_parameters(adapter, True) raised"):
        layer.reset_lora_parameters("default", True)
    expect(
        not torch.any(layer.lora_B["default"].weight)
        and not torch.equal(layer.lora_A["default"].weight, before),
        internal,
        "reset_lora_parameters(adapter, True) no longer re-draws A and zeroes B",
    )


def test_prefix_tuning_adapter_file_layout():
    internal = Internal(
        "peft",
        "PREFIX_TUNING adapter weights: one 'prompt_embeddings' tensor "
        "[num_virtual_tokens, num_layers * 2 * token_dim]; PrefixTuningConfig fields",
        "peft_configs/shared_prefix/model.py (SharedPrefixModel.export_prefix_tuning)",
        "write the exported adapter in PEFT's new prompt-learning layout",
    )
    fields = {f.name for f in dataclasses.fields(PrefixTuningConfig)}
    wanted = {
        "num_virtual_tokens",
        "token_dim",
        "num_layers",
        "num_attention_heads",
        "num_transformer_submodules",
        "prefix_projection",
        "inference_mode",
    }
    expect(wanted <= fields, internal, f"PrefixTuningConfig lost {sorted(wanted - fields)}")
    model = get_peft_model(
        tiny_llama("eager"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    state = get_peft_model_state_dict(model)
    kv_dim = 2 * 8  # tiny_llama: 2 key/value heads of 8
    expect(
        set(state) == {"prompt_embeddings"}
        and tuple(state["prompt_embeddings"].shape) == (3, 2 * 2 * kv_dim),
        internal,
        f"a PREFIX_TUNING adapter's state is now { ({k: tuple(v.shape) for k, v in state.items()}) }",
    )


# ============================================================================= transformers: attention


INJECTION = "peft_configs/injection.py"


#: the model families peft_configs' prefix methods support (see injection.py's docstring).
FAMILIES: dict[str, Callable[[str], nn.Module]] = {
    "bert": lambda impl: tiny_bert_classifier(attn_implementation=impl),
    "roberta": tiny_roberta,
    "vit": lambda impl: tiny_vit_classifier(attn_implementation=impl),
    "gpt2": lambda impl: tiny_gpt2(attn_implementation=impl),
    "llama": lambda impl: tiny_llama(impl),
}
#: width of one prefix key (num_key_value_heads * head_dim) of each tiny model.
KV_DIM = {"bert": 32, "roberta": 32, "vit": 32, "gpt2": 32, "llama": 16}


def _inputs(family: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 1, 8, 8, generator=generator)}
    ids = torch.randint(3, 90, (2, 5), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _recorded_attention_class(model: nn.Module) -> tuple[object, type | None]:
    recorder = (getattr(type(model), "_can_record_outputs", None) or {}).get("attentions")
    cls = recorder if isinstance(recorder, type) else getattr(recorder, "target_class", None)
    return recorder, cls


def test_attention_registry_is_shared_and_holds_our_function():
    internal = Internal(
        "transformers",
        "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS / AttentionInterface.register",
        f"{INJECTION} (module level: AttentionInterface.register, PrefixSite.base_function)",
        "register prefix_attention_forward where model files now look attention functions up",
    )
    expect(
        isinstance(ALL_ATTENTION_FUNCTIONS, AttentionInterface),
        internal,
        f"ALL_ATTENTION_FUNCTIONS is now a {type(ALL_ATTENTION_FUNCTIONS).__name__}",
    )
    with upstream(internal, "ALL_ATTENTION_FUNCTIONS lookups raised"):
        ours = ALL_ATTENTION_FUNCTIONS[PREFIX_ATTENTION]
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    expect(
        ours is prefix_attention_forward,
        internal,
        "AttentionInterface.register no longer reaches the global ALL_ATTENTION_FUNCTIONS",
    )
    expect(callable(sdpa), internal, "ALL_ATTENTION_FUNCTIONS has no 'sdpa' function")


@pytest.mark.parametrize("family", FAMILIES)
def test_can_record_outputs_names_the_self_attention_class(family):
    model = FAMILIES[family]("eager")
    internal = Internal(
        "transformers",
        f"{type(model).__name__}._can_record_outputs['attentions']",
        f"{INJECTION} (find_self_attention_modules, _attention_classes)",
        "find the self-attention modules through the attribute transformers now uses to "
        "record attention weights",
    )
    table = getattr(type(model), "_can_record_outputs", None)
    expect(
        isinstance(table, Mapping) and "attentions" in table,
        internal,
        f"{type(model).__name__}._can_record_outputs has no 'attentions' entry ({table!r})",
    )
    recorder, cls = _recorded_attention_class(model)
    expect(
        isinstance(cls, type) and issubclass(cls, nn.Module),
        internal,
        f"_can_record_outputs['attentions'] is {recorder!r}: neither a module class nor an "
        "OutputRecorder with .target_class",
    )
    layers = model.config.num_hidden_layers
    found = [
        m
        for m in model.modules()
        if isinstance(m, cls) and not getattr(m, "is_cross_attention", False)
    ]
    expect(
        len(found) == layers and all(hasattr(m, "config") for m in found),
        internal,
        f"{cls.__name__} gives {len(found)} self-attention modules with a .config for "
        f"{layers} layers",
    )
    with upstream(internal, "find_self_attention_modules failed"):
        ours = find_self_attention_modules(model)
    expect(len(ours) == layers, internal, "find_self_attention_modules does not find one per layer")


@pytest.mark.parametrize("family", FAMILIES)
def test_model_file_defines_eager_attention_forward(family):
    model = FAMILIES[family]("eager")
    _, cls = _recorded_attention_class(model)  # its module is what PrefixSite.base_function reads
    module = sys.modules[(cls or type(model)).__module__]
    internal = Internal(
        "transformers",
        f"{module.__name__}.eager_attention_forward(module, query, key, value, attention_mask, "
        "scaling=, dropout=, **kwargs)",
        f"{INJECTION} (PrefixSite.base_function, prefix_attention_forward)",
        "find the eager function where the model file now gets it (e.g. a shared module or "
        "ALL_ATTENTION_FUNCTIONS['eager'])",
    )
    function = getattr(module, "eager_attention_forward", None)
    expect(
        callable(function),
        internal,
        f"{module.__name__} no longer defines eager_attention_forward at module level",
    )
    parameters = list(inspect.signature(function).parameters.values())
    head = [p.name for p in parameters[:5]]
    expect(
        head == ["module", "query", "key", "value", "attention_mask"],
        internal,
        f"eager_attention_forward's leading parameters are now {head}",
    )
    for name in ("scaling", "dropout"):
        expect(
            name in {p.name for p in parameters} or _takes_var_keyword(function),
            internal,
            f"eager_attention_forward no longer accepts {name}=",
        )
    expect(
        getattr(module, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
        is ALL_ATTENTION_FUNCTIONS,
        internal,
        f"{module.__name__} looks attention functions up in another registry than "
        "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS",
    )


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_dispatches_on_its_config_attn_implementation(family, implementation):
    internal = Internal(
        "transformers",
        "attention modules calling ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation] "
        "at every forward",
        f"{INJECTION} (attach_prefix_sites routes a module through _PrefixRoutedConfig)",
        "route the chosen attention modules the way this release selects attention functions",
    )
    model = FAMILIES[family](implementation)
    inputs = _inputs(family)
    with torch.no_grad(), upstream(internal, f"a plain {implementation} forward raised"):
        baseline = model(**inputs)[0]
    with upstream(internal, "attach_prefix_sites failed"):
        sites = list(attach_prefix_sites(model).values())
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return prefix_attention_forward(*args, **kwargs)

    generator = torch.Generator().manual_seed(1)
    AttentionInterface.register(PREFIX_ATTENTION, counting)
    try:
        with torch.no_grad(), upstream(internal, "a forward through the routed attention raised"):
            plain = model(**inputs)[0]
            routed_calls = len(calls)
            with contextlib.ExitStack() as stack:
                for site in sites:
                    keys = torch.randn(2, site.kv_dim, generator=generator)
                    stack.enter_context(site.inject(keys, torch.randn_like(keys)))
                prefixed = model(**inputs)[0]
    finally:
        AttentionInterface.register(PREFIX_ATTENTION, prefix_attention_forward)
    expect(
        routed_calls == len(sites),
        internal,
        f"one forward called the attention function registered under the module's "
        f"config._attn_implementation {routed_calls} times for {len(sites)} routed modules",
    )
    expect(
        torch.equal(plain, baseline),
        internal,
        "routing through the registered function without a prefix changed the outputs",
    )
    expect(
        not torch.allclose(prefixed, baseline),
        internal,
        "an injected prefix does not change the outputs",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_module_layout_known_to_prefix_sites(family):
    internal = Internal(
        "transformers",
        "attention module attributes (head_dim / attention_head_size, num_key_value_groups; "
        "k_proj+v_proj / key+value / c_attn+split_size) and the layer's pre-attention norm "
        "(layernorm_before / ln_1 / input_layernorm)",
        f"{INJECTION} (_geometry, PrefixSite.project, _pre_attention_norm)",
        "teach _geometry / PrefixSite.project / _PRE_ATTENTION_NORMS the new attribute names",
    )
    model = FAMILIES[family]("eager")
    hidden = model.config.hidden_size
    with upstream(internal, "attach_prefix_sites failed"):
        sites = attach_prefix_sites(model)
    for name, site in sites.items():
        expect(
            site.kv_dim == KV_DIM[family] and site.num_heads * site.head_dim == hidden,
            internal,
            f"{name}: read kv_dim={site.kv_dim}, heads={site.num_heads}x{site.head_dim} "
            f"(expected kv_dim={KV_DIM[family]}, width {hidden})",
        )
        expect(site.pre_norm is not None, internal, f"{name}: no pre-attention norm found")
        with upstream(internal, f"{name}: PrefixSite.project found no key/value projections"):
            keys, values = site.project(torch.randn(3, hidden))
        expect(
            keys.shape == values.shape == (3, site.kv_dim),
            internal,
            f"{name}: projected keys {tuple(keys.shape)}, values {tuple(values.shape)}",
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_blocks_receive_hidden_states_first(family):
    internal = Internal(
        "transformers",
        "decoder/encoder layer forward(hidden_states, ...) inside an nn.ModuleList",
        "peft_configs/prompt_pool/selection.py (transformer_blocks, block_input) used by "
        "peft_configs/prompt_pool/model.py (query_source='layer_k_cls')",
        "find the block input the new way the layer is called",
    )
    model = FAMILIES[family]("eager")
    with upstream(internal, "transformer_blocks found no ModuleList element around attention"):
        blocks = transformer_blocks(model)
    seen = []
    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(block_input(args, kwargs).shape),
            with_kwargs=True,
        )
        for block in blocks
    ]
    try:
        with torch.no_grad(), upstream(internal, "a block's input has no hidden states"):
            model(**_inputs(family))
    finally:
        for handle in handles:
            handle.remove()
    expect(
        len(seen) == len(blocks) == model.config.num_hidden_layers
        and all(shape[0] == 2 and shape[-1] == model.config.hidden_size for shape in seen),
        internal,
        f"blocks saw hidden states {seen}",
    )


def test_gpt2_attention_flags():
    internal = Internal(
        "transformers",
        "GPT2Attention.is_cross_attention and GPT2Attention.reorder_and_upcast_attn",
        f"{INJECTION} (find_self_attention_modules skips cross-attention; attach_prefix_sites "
        "refuses reorder_and_upcast_attn)",
        "read the renamed flags in find_self_attention_modules / attach_prefix_sites",
    )
    config = GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        add_cross_attention=True,
        reorder_and_upcast_attn=True,
    )
    model = GPT2LMHeadModel(config)
    cross = [m for m in model.modules() if getattr(m, "is_cross_attention", False)]
    expect(len(cross) == 2, internal, "cross-attention modules no longer set is_cross_attention")
    with upstream(internal, "find_self_attention_modules failed"):
        found = find_self_attention_modules(model)
    expect(
        len(found) == 2 and all(getattr(m, "reorder_and_upcast_attn", False) for _, m in found),
        internal,
        "GPT2Attention no longer exposes reorder_and_upcast_attn",
    )
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        attach_prefix_sites(model)


def test_config_attn_implementation_is_read_and_written():
    internal = Internal(
        "transformers",
        "PreTrainedConfig._attn_implementation (read, and set before building a model)",
        f"{INJECTION} (PrefixSite.implementation), hf_extensions/bnn/ (_build_peer, "
        "PeerEnsemble.save_config)",
        "read / set the attention implementation through the config's new API",
    )
    for implementation in ("eager", "sdpa"):
        config = AutoConfig.for_model(
            "bert",
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
        with upstream(internal, "setting config._attn_implementation raised"):
            config._attn_implementation = implementation
        model = BertModel(config)
        expect(
            getattr(model.config, "_attn_implementation", None) == implementation,
            internal,
            f"a model built from a config with _attn_implementation={implementation!r} reports "
            f"{getattr(model.config, '_attn_implementation', None)!r}",
        )


def test_config_name_or_path_private_attribute():
    internal = Internal(
        "transformers",
        "PreTrainedConfig._name_or_path",
        "trainers/method_trainer.py (MethodTrainer.card_base_model), "
        "trainers/bnn_mutual_trainer.py (card_base_model)",
        "read config.name_or_path instead",
    )
    config = BertConfig()
    config.name_or_path = "org/model"
    expect(
        getattr(config, "_name_or_path", None) == "org/model",
        internal,
        "config._name_or_path no longer mirrors config.name_or_path",
    )


# ============================================================================= transformers: CLIP


def test_clip_text_tower_internals_reproduce_get_text_features():
    internal = Internal(
        "transformers",
        "transformers.masking_utils.create_causal_mask(config, inputs_embeds, "
        "attention_mask, cache) called positionally and the CLIP text tower's "
        "embeddings(inputs_embeds=) / "
        "encoder(inputs_embeds=, attention_mask=, is_causal=) / final_layer_norm",
        "hf_extensions/pga/clip_prompts.py (encode_text_embeddings)",
        "re-derive encode_text_embeddings from this release's CLIP text-model forward",
    )
    names = list(_parameters(create_causal_mask))
    # the fourth was `past_key_values` before 5.24, `cache` since
    expect(
        names[:3] == ["config", "inputs_embeds", "attention_mask"]
        and names[3] in ("cache", "past_key_values"),
        internal,
        f"create_causal_mask's parameters are now {names}",
    )
    clip, tokenizer = tiny_clip()
    ids = tokenizer(["a photo of a cat.", "dog"], padding=True, return_tensors="pt").input_ids
    eos = _eos_positions(ids, clip.config.text_config.eos_token_id)
    with torch.no_grad():
        with upstream(internal, "encode_text_embeddings raised"):
            ours = encode_text_embeddings(
                clip, clip.text_model.embeddings.token_embedding(ids), eos
            )
        theirs = _projected(clip.get_text_features(input_ids=ids))
    expect(
        torch.allclose(ours, theirs, atol=1e-5),
        internal,
        "encode_text_embeddings no longer equals CLIPModel.get_text_features "
        f"(max diff {(ours - theirs).abs().max().item():.3g})",
    )


# ============================================================================= transformers: Trainer


class _ProbeModel(nn.Module):
    """One weight ``w``; the loss is ``w * x.sum()``, so ``w.grad`` shows how Trainer scaled it."""

    def __init__(self, accepts_loss_kwargs: bool | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        if accepts_loss_kwargs is not None:
            self.accepts_loss_kwargs = accepts_loss_kwargs

    def forward(self, x, labels=None, **kwargs):
        return {"loss": self.w * x.sum()}


def _trainer(tmp_path, cls: type = Trainer, accepts_loss_kwargs: bool | None = None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    return cls(model=_ProbeModel(accepts_loss_kwargs), args=args)


#: Trainer method -> (parameters, "overridden" (must match exactly) or "called" (prefix), ours)
TRAINER_METHODS = {
    "_prepare_inputs": (
        ("inputs",),
        "called",
        "trainers/perturbation_trainer.py, trainers/pga_trainer.py (training_step)",
    ),
    "_get_num_items_in_batch": (
        ("batch_samples", "device"),
        "called",
        "trainers/perturbation_trainer.py (PerturbationTrainer.subset_scale)",
    ),
    "_remove_unused_columns": (
        ("dataset", "description"),
        "called",
        "trainers/hierarchical_cl_trainer.py (_loader)",
    ),
    "compute_loss_context_manager": (
        (),
        "called",
        "trainers/perturbation_trainer.py (loss), trainers/pga_trainer.py (training_step)",
    ),
    "_save": (
        ("output_dir", "state_dict"),
        "overridden",
        "trainers/fhbi_trainer.py, trainers/bnn_mutual_trainer.py (_save)",
    ),
    "_set_signature_columns_if_needed": (
        (),
        "overridden",
        "trainers/bnn_mutual_trainer.py (_set_signature_columns_if_needed)",
    ),
    "save_model": (
        ("output_dir", "_internal_call"),
        "overridden",
        "trainers/hierarchical_cl_trainer.py (save_model)",
    ),
    "log": (("logs", "start_time"), "overridden", "trainers/method_trainer.py (MethodTrainer.log)"),
    "training_step": (
        ("model", "inputs", "num_items_in_batch"),
        "overridden",
        "trainers/perturbation_trainer.py, trainers/pga_trainer.py (training_step)",
    ),
    "compute_loss": (
        ("model", "inputs", "return_outputs", "num_items_in_batch"),
        "overridden",
        "trainers/fhbi_trainer.py, bnn_mutual_trainer.py, hierarchical_cl_trainer.py, "
        "prompt_dsi_trainer.py (compute_loss)",
    ),
    "create_optimizer": (
        ("model",),
        "overridden",
        "trainers/prompt_dsi_trainer.py (create_optimizer)",
    ),
    "_save_checkpoint": (
        ("model", "trial"),
        "overridden",
        "trainers/method_trainer.py (MethodTrainer._save_checkpoint)",
    ),
    "_get_output_dir": (
        ("trial",),
        "called",
        "trainers/method_trainer.py (MethodTrainer._save_checkpoint)",
    ),
}


@pytest.mark.parametrize("method", TRAINER_METHODS)
def test_trainer_method_signature(method):
    parameters, use, ours = TRAINER_METHODS[method]
    internal = Internal(
        "transformers",
        f"Trainer.{method}{parameters}",
        ours,
        f"update our {'override' if use == 'overridden' else 'call'} to Trainer's new "
        f"{method} (or to what replaced it)",
    )
    function = getattr(Trainer, method, None)
    expect(callable(function), internal, f"Trainer no longer has {method}")
    found = _parameters(function)
    if use == "overridden":
        expect(
            found == parameters,
            internal,
            f"Trainer.{method} now takes {found}: Trainer calls our override with them",
        )
    else:
        expect(
            found[: len(parameters)] == parameters,
            internal,
            f"Trainer.{method} now takes {found}",
        )


def test_trainer_checkpoint_is_written_into_the_output_dir_with_trainer_state_last(
    tmp_path, monkeypatch
):
    """hf_extensions/checkpoints.py reads a ``checkpoint-N`` folder as complete when its
    ``trainer_state.json`` is there (and the weights, optimizer and RNG files it checks); that
    holds only while ``Trainer._save_checkpoint`` writes that file after all the others."""
    from transformers.trainer_callback import TrainerState

    internal = Internal(
        "transformers",
        "Trainer._save_checkpoint's layout: _get_output_dir()/checkpoint-N/, "
        "trainer_state.json written last",
        "hf_extensions/checkpoints.py (checkpoint_problem), trainers/method_trainer.py "
        "(MethodTrainer._save_checkpoint)",
        "make checkpoint_problem check what now marks a finished save (or stage the "
        "checkpoint and rename it into place in MethodTrainer._save_checkpoint)",
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, max_steps=1,
        save_strategy="steps", save_steps=1, per_device_train_batch_size=2, optim="sgd",
    )  # fmt: skip
    data = [{"x": torch.ones(2)} for _ in range(2)]
    trainer = Trainer(model=_ProbeModel(), args=args, train_dataset=data)
    expect(trainer._get_output_dir(trial=None) == str(tmp_path), internal, "another run_dir")
    seen: list[set[str]] = []
    save_to_json = TrainerState.save_to_json

    def spy(state, json_path):
        seen.append({entry.name for entry in Path(json_path).parent.iterdir()})
        return save_to_json(state, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", spy)
    trainer.train()
    expect(seen, internal, "trainer_state.json is no longer written by TrainerState.save_to_json")
    needed = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
    expect(
        needed <= seen[0],
        internal,
        f"when trainer_state.json is written the folder holds only {sorted(seen[0])}",
    )
    expect(
        (tmp_path / "checkpoint-1" / "trainer_state.json").is_file(), internal, "no checkpoint-1"
    )


@pytest.mark.parametrize(
    "attribute, ours",
    [
        ("model_accepts_loss_kwargs", "trainers/perturbation_trainer.py (_is_loss_scaled_for_ga)"),
        ("compute_loss_func", "trainers/perturbation_trainer.py (_is_loss_scaled_for_ga)"),
        ("loss_is_scaled_for_ga", "trainers/perturbation_trainer.py (_is_loss_scaled_for_ga)"),
        ("is_deepspeed_enabled", "trainers/perturbation_trainer.py (__init__)"),
        ("is_fsdp_enabled", "trainers/perturbation_trainer.py (__init__)"),
        ("_signature_columns", "trainers/bnn_mutual_trainer.py (_set_signature_columns_if_needed)"),
        ("model_wrapped", "benchmarks/harness.py (trainer_step_fn)"),
    ],
)
def test_trainer_instance_attribute(attribute, ours, tmp_path):
    internal = Internal(
        "transformers",
        f"Trainer.{attribute}",
        ours,
        "read / set what Trainer now uses instead",
    )
    trainer = _trainer(tmp_path)
    expect(hasattr(trainer, attribute), internal, f"a Trainer no longer has .{attribute}")


def test_model_accepts_loss_kwargs_follows_the_model_attribute(tmp_path):
    internal = Internal(
        "transformers",
        "model.accepts_loss_kwargs -> Trainer.model_accepts_loss_kwargs",
        "trainers/prompt_dsi_trainer.py, trainers/hierarchical_cl_trainer.py (__init__), "
        "hf_extensions/bnn/ (PeerEnsemble), hf_extensions/fhbi/particles.py "
        "(ParticleEnsemble), recipes/shared_prefix/train.py",
        "tell Trainer that the loss is a batch mean in the way it now reads",
    )
    for value in (False, True):
        trainer = _trainer(tmp_path, accepts_loss_kwargs=value)
        expect(
            trainer.model_accepts_loss_kwargs is value,
            internal,
            f"a model with accepts_loss_kwargs={value} gives "
            f"Trainer.model_accepts_loss_kwargs={trainer.model_accepts_loss_kwargs}",
        )


@pytest.mark.parametrize(
    "accepts, num_items, scaled_flag, loss_func",
    [
        (False, None, None, False),
        (True, None, None, False),
        (True, 4, None, False),
        (False, 4, None, False),
        (False, None, True, False),
        (True, 4, False, False),
        (False, None, None, True),
    ],
)
def test_training_step_scales_accumulation_by_our_rule(
    accepts, num_items, scaled_flag, loss_func, tmp_path
):
    internal = Internal(
        "transformers",
        "Trainer.training_step: loss / current_gradient_accumulation_steps unless "
        "loss_is_scaled_for_ga, or (model_accepts_loss_kwargs and num_items_in_batch), "
        "or compute_loss_func",
        "trainers/perturbation_trainer.py (PerturbationTrainer._is_loss_scaled_for_ga, "
        "training_step), trainers/pga_trainer.py (training_step, _add_gradients)",
        "copy Trainer.training_step's new scaling rule into _is_loss_scaled_for_ga",
    )
    trainer = _trainer(tmp_path, accepts_loss_kwargs=accepts)
    if scaled_flag is not None:
        trainer.loss_is_scaled_for_ga = scaled_flag
    if loss_func:
        trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs["loss"]
    trainer.current_gradient_accumulation_steps = 4
    with upstream(internal, "Trainer.training_step raised"):
        trainer.training_step(trainer.model, {"x": torch.ones(1)}, num_items_in_batch=num_items)
    gradient = float(trainer.model.w.grad)
    theirs = abs(gradient - 1.0) < 1e-6
    expect(
        theirs or abs(gradient - 0.25) < 1e-6,
        internal,
        f"training_step gave gradient {gradient} (expected 1 or 1/4)",
    )
    ours = PerturbationTrainer._is_loss_scaled_for_ga(trainer, num_items)
    expect(
        theirs == ours,
        internal,
        f"with model_accepts_loss_kwargs={accepts}, num_items_in_batch={num_items}, "
        f"loss_is_scaled_for_ga={scaled_flag}, compute_loss_func={loss_func} Trainer "
        f"{'does not divide' if theirs else 'divides'} by current_gradient_accumulation_steps, "
        f"our rule says it {'does not' if ours else 'does'}",
    )


def test_training_loop_sets_current_gradient_accumulation_steps():
    internal = Internal(
        "transformers",
        "Trainer.current_gradient_accumulation_steps (set per step by the training loop)",
        "trainers/perturbation_trainer.py (training_step), trainers/pga_trainer.py "
        "(training_step, _add_gradients), benchmarks/harness.py (trainer_step_fn)",
        "read the micro-batch count of the step where the loop now keeps it",
    )
    import transformers.trainer as trainer_module

    source = inspect.getsource(trainer_module)
    expect(
        "self.current_gradient_accumulation_steps =" in source,
        internal,
        "the training loop no longer assigns self.current_gradient_accumulation_steps",
    )
    expect(
        "self.current_gradient_accumulation_steps" in inspect.getsource(Trainer.training_step),
        internal,
        "Trainer.training_step no longer divides by current_gradient_accumulation_steps",
    )


def test_get_num_items_in_batch_counts_labels(tmp_path):
    internal = Internal(
        "transformers",
        "Trainer._get_num_items_in_batch(batch_samples, device): labels != -100, or None "
        "when the loss is a batch mean",
        "trainers/perturbation_trainer.py (PerturbationTrainer.subset_scale)",
        "count the items of a sub-batch the way Trainer now normalises the loss",
    )
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    device = torch.device("cpu")
    counting = _trainer(tmp_path, accepts_loss_kwargs=True)
    with upstream(internal, "_get_num_items_in_batch raised"):
        count = counting._get_num_items_in_batch([{"labels": labels}], device)
        none = _trainer(tmp_path, accepts_loss_kwargs=False)._get_num_items_in_batch(
            [{"labels": labels}], device
        )
    expect(
        count is not None and int(count) == 4,
        internal,
        f"for labels {labels.tolist()} it returned {count!r}, not 4",
    )
    expect(none is None, internal, f"without loss kwargs it returned {none!r}, not None")


def test_prepare_inputs_returns_the_batch_on_the_device(tmp_path):
    internal = Internal(
        "transformers",
        "Trainer._prepare_inputs(inputs) -> same mapping, tensors on args.device",
        "trainers/perturbation_trainer.py, trainers/pga_trainer.py (training_step)",
        "prepare the batch the way Trainer.training_step now does",
    )
    trainer = _trainer(tmp_path)
    batch = {"x": torch.ones(2), "nested": {"y": torch.zeros(1)}}
    with upstream(internal, "_prepare_inputs raised"):
        prepared = trainer._prepare_inputs(batch)
    expect(
        set(prepared) == {"x", "nested"}
        and prepared["x"].device == trainer.args.device
        and prepared["nested"]["y"].device == trainer.args.device,
        internal,
        f"_prepare_inputs returned {prepared!r}",
    )


def test_save_model_and_checkpoints_go_through__save(tmp_path):
    internal = Internal(
        "transformers",
        "Trainer.save_model -> self._save(output_dir, state_dict=...); "
        "Trainer._save_checkpoint -> self.save_model(...)",
        "trainers/fhbi_trainer.py, trainers/bnn_mutual_trainer.py (_save: per-particle "
        "adapters / peer_ensemble.json in final saves and checkpoints)",
        "hook the extra files into the method Trainer now saves through",
    )
    calls = []

    class SpyTrainer(Trainer):
        def _save(self, output_dir=None, state_dict=None):
            calls.append(output_dir)
            super()._save(output_dir, state_dict=state_dict)

    trainer = _trainer(tmp_path, cls=SpyTrainer)
    target = str(tmp_path / "saved")
    with upstream(internal, "save_model raised"):
        trainer.save_model(target)
    expect(calls == [target], internal, f"save_model called _save with {calls}")
    expect(
        "self.save_model(" in inspect.getsource(Trainer._save_checkpoint),
        internal,
        "Trainer._save_checkpoint no longer saves the model through self.save_model",
    )


def test_remove_unused_columns_uses_overridden_signature_columns(tmp_path):
    internal = Internal(
        "transformers",
        "Trainer._remove_unused_columns -> self._set_signature_columns_if_needed() -> "
        "self._signature_columns",
        "trainers/bnn_mutual_trainer.py (_set_signature_columns_if_needed), "
        "trainers/hierarchical_cl_trainer.py (_loader)",
        "declare the ensemble's input columns where Trainer now reads them",
    )

    class ColumnsTrainer(Trainer):
        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["x", "label", "label_ids", *self.label_names]

    trainer = _trainer(tmp_path, cls=ColumnsTrainer)
    data = datasets.Dataset.from_dict({"x": [1.0], "label": [0], "junk": [2]})
    with upstream(internal, "_remove_unused_columns raised"):
        kept = trainer._remove_unused_columns(data, description="probe")
    expect(
        set(kept.column_names) == {"x", "label"},
        internal,
        f"_remove_unused_columns kept {kept.column_names}",
    )


# ============================================================================= accelerate


def test_accelerator_backward_scales_whenever_a_scaler_is_set(tmp_path):
    internal = Internal(
        "accelerate",
        "Accelerator.backward: scaler.scale(loss).backward() whenever accelerator.scaler is set "
        "(not under DeepSpeed / Megatron-LM)",
        "hf_extensions/perturbation.py (loss_scaler, local_gradients), "
        "trainers/perturbation_trainer.py, trainers/fhbi_trainer.py, trainers/pga_trainer.py",
        "copy Accelerator.backward's new scaling rule into perturbation.loss_scaler",
    )
    accelerator = _trainer(tmp_path).accelerator
    weight = nn.Parameter(torch.ones(()))
    saved = accelerator.scaler
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    try:
        with upstream(internal, "Accelerator.backward raised"):
            accelerator.backward(weight * 1.0)
    finally:
        accelerator.scaler = saved
    expect(
        float(weight.grad) == 8.0,
        internal,
        f"with a GradScaler of scale 8 set, backward gave gradient {float(weight.grad)}",
    )


def test_unscale_gradients_needs_native_amp_and_fp16(tmp_path):
    internal = Internal(
        "accelerate",
        "Accelerator.unscale_gradients only when native_amp and mixed_precision == 'fp16'; "
        "Accelerator.mixed_precision reads AcceleratorState._mixed_precision",
        "hf_extensions/perturbation.py (loss_scaler), "
        "hf_extensions/mixed_precision.py (fp16_loss_scaling)",
        "update loss_scaler's refusal and fp16_loss_scaling's assignments to accelerate's new "
        "fp16 state",
    )
    accelerator = _trainer(tmp_path).accelerator
    state = accelerator.state
    expect(
        hasattr(state, "_mixed_precision") and hasattr(accelerator, "native_amp"),
        internal,
        "AcceleratorState._mixed_precision or Accelerator.native_amp is gone",
    )
    saved = (state._mixed_precision, accelerator.native_amp, accelerator.scaler)
    grads = {}
    try:
        for native_amp in (False, True):
            weight = nn.Parameter(torch.ones(()))
            optimizer = torch.optim.SGD([weight], lr=0.1)
            state._mixed_precision = "fp16"
            accelerator.native_amp = native_amp
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
            expect(
                accelerator.mixed_precision == "fp16",
                internal,
                "Accelerator.mixed_precision no longer reflects AcceleratorState._mixed_precision",
            )
            with upstream(internal, "backward / unscale_gradients raised"):
                accelerator.backward(weight * 1.0)
                accelerator.unscale_gradients(optimizer=optimizer)
            grads[native_amp] = float(weight.grad)
    finally:
        state._mixed_precision, accelerator.native_amp, accelerator.scaler = saved
    expect(
        grads == {False: 8.0, True: 1.0},
        internal,
        f"gradients after unscale_gradients (native_amp False / True): {grads}, "
        "expected 8 (not unscaled) / 1 (unscaled)",
    )


def test_accelerator_amp_attributes(tmp_path):
    internal = Internal(
        "accelerate",
        "the Accelerator attributes native_amp / scaler / autocast_handler",
        "hf_extensions/mixed_precision.py (fp16_loss_scaling)",
        "perform the assignments Accelerator.__init__'s fp16 branch now makes",
    )
    accelerator = _trainer(tmp_path).accelerator
    for attribute in ("native_amp", "scaler", "autocast_handler"):
        expect(hasattr(accelerator, attribute), internal, f"Accelerator has no .{attribute}")


# ============================================================================= diffusers


SNR = "hf_extensions/schedulers/snr.py (make_betas)"


def _alpha_bar(kind: str) -> Callable[[float], float]:
    """The alpha-bar functions of diffusers' betas_for_alpha_bar, written out."""
    if kind == "cosine":  # Nichol & Dhariwal 2021, Eq. 17, s = 0.008
        return lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "exp":
        return lambda t: math.exp(-12.0 * t)

    def laplace(t):
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * abs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    return laplace


@pytest.mark.parametrize("kind", ["cosine", "exp", "laplace"])
def test_betas_for_alpha_bar_known_values(kind):
    internal = Internal(
        "diffusers",
        "diffusers.schedulers.scheduling_ddpm.betas_for_alpha_bar(num_diffusion_timesteps, "
        "max_beta=0.999, alpha_transform_type=)",
        SNR,
        "import it from where diffusers now keeps it, or inline the schedule in make_betas",
    )
    with upstream(internal, "importing betas_for_alpha_bar from scheduling_ddpm failed"):
        from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
    steps = 4
    with upstream(internal, f"betas_for_alpha_bar({steps}, alpha_transform_type={kind!r}) raised"):
        betas = betas_for_alpha_bar(steps, alpha_transform_type=kind)
    bar = _alpha_bar(kind)
    expected = torch.tensor(
        [min(1 - bar((i + 1) / steps) / bar(i / steps), 0.999) for i in range(steps)],
        dtype=torch.float32,
    )
    expect(
        isinstance(betas, torch.Tensor) and betas.dtype == torch.float32,
        internal,
        f"betas_for_alpha_bar returned {type(betas).__name__} "
        f"{getattr(betas, 'dtype', '')}, not a float32 tensor",
    )
    expect(
        torch.allclose(betas, expected, rtol=0, atol=1e-7),
        internal,
        f"the {kind} schedule for T={steps} is now {betas.tolist()}, expected {expected.tolist()}",
    )


def test_rescale_zero_terminal_snr_known_values():
    internal = Internal(
        "diffusers",
        "diffusers.schedulers.scheduling_ddpm.rescale_zero_terminal_snr(betas)",
        SNR,
        "import it from where diffusers now keeps it, or inline Lin et al.'s Algorithm 1",
    )
    with upstream(internal, "importing rescale_zero_terminal_snr from scheduling_ddpm failed"):
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    betas = torch.linspace(0.1, 0.4, 4, dtype=torch.float64)
    with upstream(internal, "rescale_zero_terminal_snr raised"):
        rescaled = rescale_zero_terminal_snr(betas.clone())
    root = torch.cumprod(1 - betas, 0).sqrt()  # Lin et al. 2024, Algorithm 1, written out
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    bar = root**2
    expected = 1 - torch.cat([bar[:1], bar[1:] / bar[:-1]])
    expect(
        torch.allclose(rescaled, expected, atol=1e-12) and rescaled[-1] == 1.0,
        internal,
        f"rescale_zero_terminal_snr({betas.tolist()}) is now {rescaled.tolist()}, "
        f"expected {expected.tolist()} (terminal beta 1: SNR(T) = 0)",
    )


#: a diffusers scheduler that accepts each beta schedule make_betas mirrors.
BETA_REFERENCE = {
    "linear": DDPMScheduler,
    "scaled_linear": DDPMScheduler,
    "squaredcos_cap_v2": DDPMScheduler,
    "sigmoid": DDPMScheduler,
    "laplace": DDPMScheduler,
    "exp": HeunDiscreteScheduler,
}


#: (schedule, rescale_betas_zero_snr): every schedule, and rescaled where DDPM builds it.
BETA_CASES = [(schedule, False) for schedule in BETA_SCHEDULES] + [
    (schedule, True) for schedule in BETA_SCHEDULES if BETA_REFERENCE.get(schedule) is DDPMScheduler
]


@pytest.mark.parametrize("schedule, rescale", BETA_CASES)
def test_make_betas_matches_diffusers_schedulers(schedule, rescale):
    reference = BETA_REFERENCE.get(schedule)
    assert reference is not None, (
        f"add a diffusers scheduler building {schedule!r} to BETA_REFERENCE"
    )
    internal = Internal(
        "diffusers",
        f"{reference.__name__}(beta_schedule={schedule!r}, rescale_betas_zero_snr={rescale}).betas",
        SNR + " and hf_extensions/schedulers/scheduling_s2n.py (S2NGeneralizedScheduler)",
        "update make_betas (it reproduces diffusers' beta formulas) to the new formula",
    )
    kwargs = {"num_train_timesteps": 10, "beta_schedule": schedule}
    if rescale:
        kwargs["rescale_betas_zero_snr"] = True
    with upstream(internal, f"{reference.__name__}(**{kwargs}) raised"):
        theirs = reference(**kwargs).betas
    with upstream(internal, "make_betas raised"):
        ours = make_betas(10, beta_schedule=schedule, rescale_betas_zero_snr=rescale)
    expect(
        torch.allclose(ours, theirs.to(ours.dtype), rtol=0, atol=1e-7),
        internal,
        f"diffusers now builds {theirs.tolist()}, make_betas {ours.tolist()}",
    )


def test_beta_references_cover_every_supported_schedule():
    assert set(BETA_REFERENCE) == set(BETA_SCHEDULES)


def test_scheduler_compatibles_come_from__compatibles():
    internal = Internal(
        "diffusers",
        "SchedulerMixin._compatibles (+ KarrasDiffusionSchedulers names) -> .compatibles",
        "hf_extensions/schedulers/scheduling_s2n.py (S2NGeneralizedScheduler._compatibles)",
        "declare compatibility the way SchedulerMixin now reads it",
    )
    with upstream(internal, "S2NGeneralizedScheduler().compatibles raised"):
        compatibles = S2NGeneralizedScheduler().compatibles
    expect(
        DDIMScheduler in compatibles and DPMSolverMultistepScheduler in compatibles,
        internal,
        f"compatibles are {[c.__name__ for c in compatibles]}",
    )


@pytest.mark.parametrize(
    "scheduler_cls, key",
    [(FlowMatchEulerDiscreteScheduler, "shift"), (EDMEulerScheduler, "sigma_data")],
)
def test_scheduler_configs_carry_the_keys_the_vp_guard_reads(scheduler_cls, key, tmp_path):
    internal = Internal(
        "diffusers",
        f"scheduler config keys `_class_name` (saved configs) and `{key}` "
        f"({scheduler_cls.__name__})",
        "hf_extensions/schedulers/scheduling_s2n.py (S2NGeneralizedScheduler.from_config "
        "refuses non-VP configs)",
        "update the non-VP detection in S2NGeneralizedScheduler.from_config",
    )
    scheduler = scheduler_cls()
    expect(key in scheduler.config, internal, f"{scheduler_cls.__name__}.config has no {key!r}")
    scheduler.save_config(str(tmp_path))
    with upstream(internal, "load_config of a saved scheduler config failed"):
        loaded = scheduler_cls.load_config(str(tmp_path))
    expect(
        loaded.get("_class_name") == scheduler_cls.__name__,
        internal,
        f"a saved config's _class_name is {loaded.get('_class_name')!r}",
    )
    for config in (scheduler.config, loaded):
        with pytest.raises(ValueError, match="not a variance-preserving"):
            S2NGeneralizedScheduler.from_config(config)


def test_randn_tensor_signature_and_determinism():
    from diffusers.utils.torch_utils import randn_tensor

    internal = Internal(
        "diffusers",
        "diffusers.utils.torch_utils.randn_tensor(shape, generator=, device=, dtype=)",
        "hf_extensions/schedulers/scheduling_s2n.py (S2NGeneralizedScheduler.step: the same "
        "noise draws as DDIM's)",
        "draw the variance noise the way DDIMScheduler.step now does",
    )
    found = _parameters(randn_tensor)
    expect(
        found[:4] == ("shape", "generator", "device", "dtype"),
        internal,
        f"randn_tensor now takes {found}",
    )
    noise = randn_tensor(
        (2, 3),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    expect(
        torch.equal(noise, torch.randn(2, 3, generator=torch.Generator().manual_seed(0))),
        internal,
        "randn_tensor no longer draws torch.randn from the generator",
    )


def test_flow_match_euler_step_index_internals():
    """``S2NFlowMatchScheduler.step`` replaces ``FlowMatchEulerDiscreteScheduler.step`` and keeps
    its bookkeeping: ``_init_step_index`` / ``step_index`` / ``_step_index`` and ``sigmas``."""
    internal = Internal(
        "diffusers",
        "FlowMatchEulerDiscreteScheduler._init_step_index / step_index / _step_index / sigmas",
        "hf_extensions/schedulers/scheduling_s2n_flow.py (S2NFlowMatchScheduler.step)",
        "follow how FlowMatchEulerDiscreteScheduler.step now finds and advances its step",
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    expect(
        len(scheduler.sigmas) == len(scheduler.timesteps) + 1,
        internal,
        f"sigmas has {len(scheduler.sigmas)} entries for {len(scheduler.timesteps)} steps",
    )
    with upstream(internal, "the step bookkeeping changed"):
        expect(scheduler.step_index is None, internal, "step_index is set before the first step")
        scheduler._init_step_index(scheduler.timesteps[1])
        expect(scheduler.step_index == 1, internal, "_init_step_index no longer finds the step")
        scheduler._step_index += 1
        expect(scheduler.step_index == 2, internal, "step_index no longer reads _step_index")


# ============================================================================= transformers: quantizers


def test_quantizer_registries_resolve_our_method():
    internal = Internal(
        "transformers",
        "transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING / AUTO_QUANTIZATION_CONFIG_MAPPING "
        "(read for idempotent registration)",
        "hf_extensions/quantization/config.py, hf_extensions/quantization/hf_quantizer.py "
        "(module level)",
        "check registration through the registries' new home",
    )
    expect(
        AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is MetaAugHfQuantizer
        and AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is MetaAugConfig,
        internal,
        "register_quantizer / register_quantization_config no longer fill the AUTO_* mappings",
    )
    config = MetaAugConfig(weight_bits=4, activation_bits=None)
    with upstream(internal, "resolving our quant_method through the Auto classes failed"):
        loaded = AutoQuantizationConfig.from_dict(config.to_dict())
        quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
    expect(
        type(loaded) is MetaAugConfig and type(quantizer) is MetaAugHfQuantizer,
        internal,
        f"the Auto classes resolved {type(loaded).__name__} / {type(quantizer).__name__}",
    )


def test_hf_quantizer_calls_our_weight_loading_hooks():
    internal = Internal(
        "transformers",
        "HfQuantizer.preprocess_model -> _process_model_before_weight_loading(model, **kwargs), "
        "postprocess_model -> _process_model_after_weight_loading; is_trainable property, "
        "is_serializable()",
        "hf_extensions/quantization/hf_quantizer.py (MetaAugHfQuantizer)",
        "override the hooks HfQuantizer now calls while loading",
    )
    calls = []

    class Spy(MetaAugHfQuantizer):
        def _process_model_before_weight_loading(self, model, **kwargs):
            calls.append("before")
            return super()._process_model_before_weight_loading(model, **kwargs)

        def _process_model_after_weight_loading(self, model, **kwargs):
            calls.append("after")
            return super()._process_model_after_weight_loading(model, **kwargs)

    expect(
        isinstance(inspect.getattr_static(HfQuantizer, "is_trainable", None), property)
        and _parameters(HfQuantizer.is_serializable) == (),
        internal,
        "HfQuantizer.is_trainable is no longer a property or is_serializable takes arguments",
    )
    quantizer = Spy(MetaAugConfig(weight_bits=4, activation_bits=None), pre_quantized=True)
    model = tiny_vit_classifier()
    with upstream(internal, "preprocess_model / postprocess_model raised"):
        quantizer.preprocess_model(model)
        quantizer.postprocess_model(model)
    expect(calls == ["before", "after"], internal, f"the hooks were called {calls}")
    expect(
        any(isinstance(m, QuantLinear) for m in model.modules()),
        internal,
        "preprocess_model did not keep the modules our hook swapped in",
    )


# ============================================================================= huggingface_hub


FAKE_HUB = "hf_extensions/testing/fake_hub.py (fake_hub)"


def test_hf_api_validate_yaml_is_still_the_remote_card_check():
    internal = Internal(
        "huggingface_hub",
        "HfApi._validate_yaml(content, *, repo_type=, token=)",
        FAKE_HUB,
        "patch the method ModelCard.push_to_hub now validates through",
    )
    function = getattr(hf_api_module.HfApi, "_validate_yaml", None)
    expect(callable(function), internal, "HfApi._validate_yaml is gone")
    found = _parameters(function)
    expect(
        found == ("content", "repo_type", "token"),
        internal,
        f"HfApi._validate_yaml now takes {found}",
    )


@pytest.mark.parametrize("name", ["create_repo", "create_branch", "create_commit", "upload_folder"])
def test_module_level_hub_functions_are_bound_to_the_global_api(name):
    internal = Internal(
        "huggingface_hub",
        f"huggingface_hub.hf_api.{name} (a method bound to hf_api.api)",
        FAKE_HUB,
        "patch the module-level functions the way huggingface_hub now defines them",
    )
    function = getattr(hf_api_module, name, None)
    expect(
        isinstance(getattr(hf_api_module, "api", None), hf_api_module.HfApi)
        and getattr(function, "__self__", None) is hf_api_module.api,
        internal,
        f"hf_api.{name} is no longer a method bound to the module's HfApi instance `api`",
    )


def test_repocard_downloads_through_its_module_global():
    internal = Internal(
        "huggingface_hub",
        "huggingface_hub.repocard.hf_hub_download (the name RepoCard.load calls)",
        FAKE_HUB,
        "patch the download function RepoCard.load now uses",
    )
    expect(
        callable(getattr(repocard_module, "hf_hub_download", None))
        and "hf_hub_download(" in inspect.getsource(repocard_module.RepoCard.load),
        internal,
        "RepoCard.load no longer downloads through repocard.hf_hub_download",
    )


# ============================================================================= tokenizers


def test_bytes_to_unicode_is_gpt2s_byte_alphabet():
    internal = Internal(
        "transformers",
        "transformers.convert_slow_tokenizer.bytes_to_unicode()",
        "hf_extensions/models/tiny.py (byte_level_clip_tokenizer)",
        "inline GPT-2's bytes_to_unicode table in byte_level_clip_tokenizer",
    )
    with upstream(internal, "bytes_to_unicode could not be imported or called"):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        table = bytes_to_unicode()
    expect(
        sorted(table) == list(range(256))
        and len(set(table.values())) == 256
        and table[ord("a")] == "a"
        and table[0] == chr(256),
        internal,
        "bytes_to_unicode no longer maps the 256 bytes to GPT-2's distinct characters",
    )
