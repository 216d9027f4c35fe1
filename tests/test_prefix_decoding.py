"""Decoding with a cache for both prefix PEFT methods (peft_configs.injection.PrefixCacheLayer).

``generate()`` prefills the prompt, then feeds one token per step with the cache. Each greedy
step's scores must equal the full forward (no cache) of the sequence so far at that position,
the prefix must be written into the cache once (not recomputed and re-concatenated at every
step), and a prompt pool's query and selection must be made at the prefill from the whole prompt
and kept for every generated token.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from hf_extensions.models import tiny_gpt2, tiny_llama
from peft_configs import PromptPoolConfig, SharedPrefixTuningConfig
from peft_configs.injection import PrefixCacheLayer
from peft_configs.prompt_pool import PromptPoolLayer
from peft_configs.shared_prefix import SharedPrefixLayer

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
PROMPT, NEW = 5, 4


def _prompt(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a left-padded attention mask (the last row has two pad positions)."""
    ids = torch.randint(5, 90, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0
    return ids, mask


def _randomize(model, marker: str) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if marker in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def _generate_and_check(model, ids, mask, **forward_kwargs) -> torch.Tensor:
    """Greedy generate; assert every step's scores and token against the full forward."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
        full_mask = torch.cat([mask, torch.ones(len(ids), NEW, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=out.sequences, attention_mask=full_mask, position_ids=positions,
            use_cache=False, **forward_kwargs,
        ).logits  # fmt: skip
    keep = mask.bool().any(dim=1)
    for step, scores in enumerate(out.scores):
        expected = logits[:, PROMPT - 1 + step]
        torch.testing.assert_close(scores[keep], expected[keep], atol=1e-5, rtol=0)
        assert torch.equal(out.sequences[:, PROMPT + step], expected.argmax(-1))
    return out.sequences


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_shared_prefix_is_written_into_the_cache_once(family, implementation):
    model = get_peft_model(
        BUILDERS[family](attn_implementation=implementation),
        SharedPrefixTuningConfig(
            share="per_layer_mlp", num_virtual_tokens=3, task_type="CAUSAL_LM"
        ),
    ).eval()
    _randomize(model, "shared_prefix")
    layers = [m for m in model.modules() if isinstance(m, SharedPrefixLayer)]
    calls = []
    for layer in layers:
        original = layer.prefix
        layer.prefix = lambda name, _f=original: calls.append(name) or _f(name)
    ids, mask = _prompt()
    _generate_and_check(model, ids, mask)
    # once per layer at the prefill and once in the reference forward; not at the NEW - 1 steps
    # that read the cache
    assert len(calls) == 2 * len(layers)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_pool_selection_is_made_at_the_prefill_and_kept(family):
    model = get_peft_model(
        BUILDERS[family](),
        PromptPoolConfig(
            pool_size=6, prompt_length=2, top_k=2, key_source="learned", task_type="CAUSAL_LM"
        ),
    ).eval()
    _randomize(model, "prompt_pool_prompts")
    ids, mask = _prompt(seed=3)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    prefill = model.base_model.last_selection.clone()
    model.base_model.reset_usage()
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, PromptPoolLayer))
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.pool_state.selection.clone()))
    sequences = _generate_and_check(model, ids, mask, prompt_ids=prefill)
    assert len(seen) == NEW + 1  # prefill, NEW - 1 cached steps, the reference forward
    assert all(torch.equal(selection, prefill) for selection in seen)
    # counted at the prefill and in the reference forward, not at the cached steps
    assert int(model.base_model.usage_counts.sum()) == 2 * prefill.numel()
    # the selection of the whole generated sequence differs: recomputing it mid-generation
    # (what decoding used to do) would change the prompts
    with torch.no_grad():
        model(input_ids=sequences, attention_mask=torch.ones_like(sequences))
    assert not torch.equal(model.base_model.last_selection, prefill)


def test_prefix_cache_layer_hides_the_prefix_from_lengths_and_follows_beams():
    keys = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).reshape(2, 1, 5, 2)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    layer = PrefixCacheLayer.holding(keys, keys.clone(), 3, mask)
    assert layer.get_seq_length() == 2 and layer.get_mask_sizes(1) == (3, 0)
    layer.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    assert layer.keys.shape[2] == 6 and layer.get_seq_length() == 3
    layer.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(layer.prefix_mask, mask[[1, 1]])
    assert torch.equal(layer.keys[:, :, :5], keys[[1, 1]])
    with pytest.raises(ValueError, match="cannot crop 4 tokens"):
        layer.crop(-4)
    layer.reset()
    assert not layer.holds_prefix and layer.get_seq_length() == 0
