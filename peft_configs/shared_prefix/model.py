"""The PEFT tuner of shared-structure prefix tuning (``get_peft_model`` with its config).

Le et al., "Revisiting Prefix-tuning: Statistical Benefits of Reparameterization among Prompts",
ICLR 2025 (arXiv 2410.02200). Built as a PEFT ``BaseTuner`` that wraps self-attention modules
(PEFT refuses new prompt-learning types), so everything PEFT offers for its tuners works:
``save_pretrained`` / ``PeftModel.from_pretrained`` (latents and MLPs are saved, so training
resumes exactly), ``disable_adapter()``, several adapters, ``unload()``, ``push_to_hub``.
Additions: :meth:`SharedPrefixModel.materialize` (the inference form: prefixes stored, MLPs
dropped) and :meth:`SharedPrefixModel.export_prefix_tuning` (a materialised prefix as a stock
PEFT ``PREFIX_TUNING`` adapter for causal LMs).
"""

from __future__ import annotations

import os
import warnings

import torch
from peft import PrefixTuningConfig
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import save_file
from torch import nn

from hf_extensions.atomic import atomic_save
from hf_extensions.validation import check_allocation
from peft_configs.injection import (
    PrefixSite,
    attach_prefix_sites,
    find_self_attention_modules,
    unwrap_attention_layers,
    without_base_layer,
)
from peft_configs.shared_prefix.config import SharedPrefixTuningConfig
from peft_configs.shared_prefix.layer import GlobalPrefixSlice, SharedPrefixLayer, init_latent_

__all__ = ["DEFAULT_PER_LAYER_HIDDEN", "SharedPrefixModel"]

#: MLP width of ``per_layer_mlp`` when not given: the official vision code's 48.
DEFAULT_PER_LAYER_HIDDEN = 48
_GLOBAL_CONTAINERS = (
    "shared_prefix_embedding",
    "shared_prefix_global_up",
    "shared_prefix_global_down",
)


class SharedPrefixModel(BaseTuner):
    """Inject shared-structure prefixes into a ``transformers`` model's self-attention.

    Args:
        model: a ``transformers`` model whose attention dispatches through
            ``ALL_ATTENTION_FUNCTIONS`` (BERT/RoBERTa, ViT, GPT-2, Llama families), ``eager`` or
            ``sdpa`` attention.
        config: a :class:`SharedPrefixTuningConfig`.
        adapter_name: the adapter's name (``"default"``).

    The ``global_mlp`` latent table and MLP are held here (``shared_prefix_embedding``,
    ``shared_prefix_global_up``, ``shared_prefix_global_down``, keyed by adapter name); per-layer
    weights live in the :class:`SharedPrefixLayer` that wraps each chosen attention module.
    With ``shift_positions`` (causal LMs by default) the tokens' position ids are moved by the
    prefix length, as PEFT's ``past_key_values`` prefix moves them.

    Example::

        import peft_configs  # registers the method with PEFT
        from peft import get_peft_model
        from peft_configs import SharedPrefixTuningConfig

        model = get_peft_model(vit, SharedPrefixTuningConfig(share="per_layer_mlp",
                               num_virtual_tokens=10, modules_to_save=["classifier"]))
        ...  # train with Trainer
        model.save_pretrained("out")            # latents + MLPs: training can resume
        model.materialize()                     # inference form: plain prefix cost
    """

    prefix: str = "shared_prefix_"
    tuner_layer_cls = SharedPrefixLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    # ----------------------------------------------------------------------------- injection
    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        if not hasattr(self, "shared_prefix_embedding"):
            self.shared_prefix_embedding = nn.ParameterDict()
            self.shared_prefix_global_up = nn.ModuleDict()
            self.shared_prefix_global_down = nn.ModuleDict()
            self._prefix_targets: dict[str, tuple[int, PrefixSite]] = {}
            self._position_hook = None

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if not isinstance(peft_config, SharedPrefixTuningConfig):
            raise TypeError(
                f"expected a SharedPrefixTuningConfig, got {type(peft_config).__name__}"
            )
        return peft_config

    def _prepare_model(self, peft_config: SharedPrefixTuningConfig, model: nn.Module) -> None:
        """Find the chosen attention layers, attach their sites, resolve sizes, build globals."""
        sites = attach_prefix_sites(model, peft_config.layers)
        kv_dims = {site.kv_dim for site in sites.values()}
        if len(kv_dims) != 1:
            raise ValueError(f"attention layers of different key widths {sorted(kv_dims)}")
        (kv_dim,) = kv_dims
        uses_latent = peft_config.share in ("global_mlp", "per_layer_mlp", "per_layer_linear")
        if uses_latent and peft_config.latent_dim is None:
            peft_config.latent_dim = kv_dim
        if peft_config.share in ("global_mlp", "per_layer_mlp") and peft_config.hidden_size is None:
            peft_config.hidden_size = (
                kv_dim if peft_config.share == "global_mlp" else DEFAULT_PER_LAYER_HIDDEN
            )
        self._check_memory(peft_config, model, sites, kv_dim)
        self._prefix_targets = {
            without_base_layer(name): (position, site)
            for position, (name, site) in enumerate(sites.items())
        }

    @staticmethod
    def _check_memory(
        config: SharedPrefixTuningConfig, model: nn.Module, sites: dict, kv_dim: int
    ) -> None:
        """Refuse prefixes (latents and MLPs) that cannot fit in memory, before allocating."""
        n, layers, out = config.num_virtual_tokens, len(sites), 2 * kv_dim
        latent, hidden = config.latent_dim or 0, config.hidden_size or 0
        share = "none" if config.materialized else config.share
        model_config = getattr(model, "config", None)
        numbers = {
            "none": layers * n * out,
            "global_mlp": n * latent + (latent + 1) * hidden + (hidden + 1) * out * layers,
            "per_layer_mlp": layers * (n * latent + (latent + 1) * hidden + (hidden + 1) * out),
            "per_layer_linear": layers * (n * latent + (latent + 1) * out),
            "simple_share": layers * n * int(getattr(model_config, "hidden_size", kv_dim)),
        }[share]
        reference = next(model.parameters())
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        check_allocation(
            "num_virtual_tokens",
            numbers * dtype.itemsize,
            reference.device,
            what=f"share={share!r} prefixes ({n} tokens on {layers} layers, `latent_dim`="
            f"{config.latent_dim}, `hidden_size`={config.hidden_size})",
            fix="use fewer num_virtual_tokens, a smaller latent_dim / hidden_size, or fewer "
            "`layers`",
        )

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self._prefix_targets

    def _create_and_replace(
        self,
        peft_config: SharedPrefixTuningConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        position, site = self._prefix_targets[current_key]
        global_slice = None
        if peft_config.share == "global_mlp" and not peft_config.materialized:
            self._ensure_global(peft_config, adapter_name, site)
            global_slice = GlobalPrefixSlice(
                self.shared_prefix_embedding,
                self.shared_prefix_global_up,
                self.shared_prefix_global_down,
                adapter_name,
                position,
                site.kv_dim,
            )
        if isinstance(target, SharedPrefixLayer):
            target.update_layer(adapter_name, peft_config, global_slice, peft_config.inference_mode)
            return
        new_module = SharedPrefixLayer(target, site)
        new_module.update_layer(adapter_name, peft_config, global_slice, peft_config.inference_mode)
        self._replace_module(parent, target_name, new_module, target)

    def _ensure_global(
        self, config: SharedPrefixTuningConfig, adapter_name: str, site: PrefixSite
    ) -> None:
        """The ``global_mlp`` latent table and MLP (PEFT ``PrefixEncoder`` with projection)."""
        if adapter_name in self.shared_prefix_embedding:
            return
        reference = next(site.module.parameters())
        factory = {
            "device": reference.device,
            "dtype": reference.dtype if reference.dtype.is_floating_point else torch.float32,
        }
        out_features = 2 * site.kv_dim * len(self._prefix_targets)
        self.shared_prefix_embedding[adapter_name] = nn.Parameter(
            init_latent_(torch.empty(config.num_virtual_tokens, config.latent_dim, **factory))
        )
        self.shared_prefix_global_up[adapter_name] = nn.Linear(
            config.latent_dim, config.hidden_size, **factory
        )
        self.shared_prefix_global_down[adapter_name] = nn.Linear(
            config.hidden_size, out_features, **factory
        )

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        self._set_global_requires_grad()
        if self._position_hook is None:
            self._position_hook = model.register_forward_pre_hook(
                self._shift_position_ids, with_kwargs=True
            )

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._set_global_requires_grad()

    # ----------------------------------------------------------------------------- adapters
    def _global_containers(self) -> list[nn.Module]:
        return [getattr(self, name) for name in _GLOBAL_CONTAINERS if hasattr(self, name)]

    def _set_global_requires_grad(self, requires_grad: dict[str, bool] | None = None) -> None:
        if requires_grad is None:
            disabled = self._adapters_disabled()
            requires_grad = {
                name: (name in self.active_adapters)
                and not config.inference_mode
                and not config.materialized
                and not disabled
                for name, config in self.peft_config.items()
            }
        for container in self._global_containers():
            for name, item in container.items():
                item.requires_grad_(requires_grad.get(name, False))

    def _adapters_disabled(self) -> bool:
        """Whether ``disable_adapter()`` is in force (all layers share the flag)."""
        for module in self.model.modules():
            if isinstance(module, SharedPrefixLayer):
                return module.disable_adapters
        return False

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._set_global_requires_grad(
            {name: name in names and not inference_mode for name in self.peft_config}
        )

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for container in self._global_containers():
            for name, item in container.items():
                if name in names:
                    item.requires_grad_(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._set_global_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for container in self._global_containers():
            if adapter_name in container:
                del container[adapter_name]

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        if merge:
            raise ValueError(
                "a prefix cannot be merged into the attention weights: use model.materialize() "
                "for the inference form, or model.unload() to remove the prefixes"
            )
        unwrap_attention_layers(self.model, SharedPrefixLayer)
        if self._position_hook is not None:
            self._position_hook.remove()
            self._position_hook = None
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, adapter_names=adapter_names
        )

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of half-precision adapter weights to float32, also for the globals."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for container in self._global_containers():
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            for parameter in [item] if isinstance(item, nn.Parameter) else item.parameters():
                if parameter.dtype in (torch.float16, torch.bfloat16):
                    parameter.data = parameter.data.float()

    # ----------------------------------------------------------------------------- positions
    def _prefix_length(self) -> int:
        """Total prefix length of the active adapters that shift positions (0 if disabled)."""
        length = sum(
            self.peft_config[name].num_virtual_tokens
            for name in self.active_adapters
            if name in self.peft_config and self.peft_config[name].shift_positions
        )
        return 0 if length == 0 or self._adapters_disabled() else length

    def _shift_position_ids(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook: position ids moved by the prefix length (PEFT's prefix convention).

        PEFT's ``past_key_values`` prefix occupies cache positions ``0..n-1``, so the model numbers
        the tokens from ``n``; with ``shift_positions`` ours does the same, which is what makes an
        exported prefix (:meth:`export_prefix_tuning`) give identical outputs in stock PEFT.
        """
        shift = self._prefix_length()
        if shift == 0:
            return None
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            inputs = kwargs.get("input_ids")
            if inputs is None and args:
                inputs = args[0]
            if inputs is None:
                inputs = kwargs.get("inputs_embeds")
            if inputs is None:
                return None
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(
                past, past + inputs.shape[1], device=inputs.device
            ).unsqueeze(0)
        return args, {**kwargs, "position_ids": position_ids + shift}

    # ----------------------------------------------------------------------------- inference
    def _adapter_names(self, adapter_names: str | list[str] | None) -> list[str]:
        if adapter_names is None:
            return list(self.active_adapters)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; have {sorted(self.peft_config)}")
        return names

    def materialize(self, adapter_names: str | list[str] | None = None) -> SharedPrefixModel:
        """Replace latents + MLPs by the prefixes they produce (the inference form); in place.

        The analogue of ``merge`` for prefix tuning: afterwards each layer stores ``[P^K | P^V]``
        (frozen) and the forward pass costs exactly what plain prefix tuning costs; the outputs
        are unchanged. ``save_pretrained`` then writes the materialised form (the config records
        ``materialized=True``), which can no longer be trained as a reparameterisation.
        """
        for name in self._adapter_names(adapter_names):
            for module in self.model.modules():
                if isinstance(module, SharedPrefixLayer):
                    module.materialize(name)
            for container in self._global_containers():
                if name in container:
                    del container[name]
            self.peft_config[name].materialized = True
        return self

    def _layers_in_order(self) -> list[SharedPrefixLayer]:
        return sorted(
            (m for m in self.model.modules() if isinstance(m, SharedPrefixLayer)),
            key=lambda m: m.site.layer_index,
        )

    @torch.no_grad()
    def materialized_prefix(self, adapter_name: str = "default") -> torch.Tensor:
        """``[n, num_layers * 2 * d]``: every layer's ``[P^K | P^V]``, PEFT's prefix layout."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}")
        blocks = []
        for layer in self._layers_in_order():
            if adapter_name not in layer.share:
                continue
            was_training = layer.training
            layer.eval()
            try:
                keys, values = layer.prefix(adapter_name)
            finally:
                layer.train(was_training)
            blocks.append(torch.cat([keys, values], dim=-1))
        return torch.cat(blocks, dim=-1).detach()

    def export_prefix_tuning(
        self, save_directory: str | os.PathLike, adapter_name: str = "default"
    ) -> str:
        """Write the materialised prefix as a stock PEFT ``PREFIX_TUNING`` adapter; return the path.

        The folder holds ``adapter_config.json`` (``PrefixTuningConfig`` with
        ``prefix_projection=False``, ``inference_mode=True``) and ``adapter_model.safetensors``
        (``prompt_embeddings``), which ``PeftModel.from_pretrained`` loads without hf-extensions.
        Needs a prefix in every attention layer (PEFT's prefix covers all layers). PEFT numbers
        the tokens from ``n``: train with ``shift_positions=True`` (the causal-LM default) for the
        same outputs there.
        """
        config = self.peft_config[adapter_name]
        if config.task_type != "CAUSAL_LM":
            raise ValueError(
                "stock PEFT PREFIX_TUNING feeds the prefix as past_key_values, which works for "
                f"causal LMs only; this adapter's task_type is {config.task_type!r}"
            )
        attention = find_self_attention_modules(self.model)
        layers = [m for m in self._layers_in_order() if adapter_name in m.share]
        if len(layers) != len(attention):
            raise ValueError(
                f"PEFT's PREFIX_TUNING puts a prefix in all {len(attention)} attention layers; "
                f"adapter {adapter_name!r} has one in {len(layers)} (layers={config.layers})"
            )
        if not config.shift_positions:
            warnings.warn(
                "exporting a prefix trained without shift_positions: PEFT moves the tokens' "
                "positions by num_virtual_tokens, so its outputs will differ from this model's",
                stacklevel=2,
            )
        site = layers[0].site
        # host: exported to PEFT's PrefixTuningConfig files
        prompt_embeddings = self.materialized_prefix(adapter_name).float().cpu().contiguous()
        peft_config = PrefixTuningConfig(
            task_type=config.task_type,
            base_model_name_or_path=config.base_model_name_or_path,
            revision=config.revision,
            num_virtual_tokens=config.num_virtual_tokens,
            token_dim=site.kv_dim,
            num_layers=len(layers),
            num_attention_heads=site.num_kv_heads,
            num_transformer_submodules=1,
            prefix_projection=False,
            inference_mode=True,
        )
        with atomic_save(save_directory) as stage:  # config and weights: all or nothing
            peft_config.save_pretrained(str(stage))
            save_file(
                {"prompt_embeddings": prompt_embeddings},
                str(stage / "adapter_model.safetensors"),
                metadata={"format": "pt"},
            )
        return str(save_directory)
