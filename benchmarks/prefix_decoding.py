"""Per-token cost of decoding with a materialised shared prefix against plain decoding (issue 26).

Protocol (written before the run):

- Model: a 4-layer Llama (width 256, 4 heads, SDPA) built from a config, seed 0, eval mode; the
  same weights with a ``SharedPrefixTuningConfig(share="per_layer_mlp", num_virtual_tokens=16)``
  adapter, materialised (``materialize()``: the prefix is a fixed tensor, as it is served).
- Context: 2048 tokens (and 512, reported beside it), batch 1, greedy.
- What is timed: 16 decoding steps after the prefill, the cache cropped back to the prefilled
  length before every sample (the prefill itself is not timed). The prefix is written into the
  cache once at the prefill (``peft_configs/injection.py``, ``PrefixCacheLayer``), so a decoding
  step attends over 16 extra positions and concatenates nothing else.
- Timing: :func:`benchmarks.harness.compare`, plain and prefixed interleaved, 5 warm-up and 30
  timed rounds, one thread; the ratio of medians is ``ratios.decode_prefix_vs_plain`` (2048) and
  ``ratios.decode_prefix_vs_plain_512``.
- Claim (the issue's bar): per-token cost ≤ 1.1x plain decoding at 2k context.

The ratios are merged into ``benchmarks/results/shared_prefix.json`` (every other key kept) and
the medians go to ``config.decode_ms`` there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import peft_configs  # noqa: F401  (registers the PEFT method)
from benchmarks.harness import compare, make_parser, torch_threads
from hf_extensions.atomic import atomic_write_text
from peft_configs import SharedPrefixTuningConfig

CONTEXTS = (2048, 512)
DECODE_STEPS = 16
PREFIX_TOKENS = 16


def _models(context: int):
    config = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=context + PREFIX_TOKENS + 2 * DECODE_STEPS,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).eval()
    torch.manual_seed(0)
    adapter = SharedPrefixTuningConfig(
        share="per_layer_mlp", num_virtual_tokens=PREFIX_TOKENS, task_type="CAUSAL_LM"
    )
    prefixed = get_peft_model(LlamaForCausalLM(config).eval(), adapter).eval()
    prefixed.base_model.materialize()
    return plain, prefixed


def _decoder(model, ids: torch.Tensor):
    """``decode()``: crop the prefilled cache back to the context, then 16 greedy steps."""
    cache = DynamicCache()  # `past_key_values=`: the name transformers 5.19 (the lower bound) has
    with torch.no_grad():
        first = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = first.logits[:, -1:].argmax(-1)
    context = ids.shape[1]

    @torch.no_grad()
    def decode():
        extra = cache.get_seq_length() - context  # the prefix is not counted
        if extra:
            cache.crop(-extra)
        current = token
        for _ in range(DECODE_STEPS):
            out = model(input_ids=current, past_key_values=cache, use_cache=True)
            current = out.logits[:, -1:].argmax(-1)
        return current

    return decode


def measure(context: int, repeats: int = 30) -> dict[str, float]:
    plain, prefixed = _models(context)
    ids = torch.randint(0, 128, (1, context), generator=torch.Generator().manual_seed(1))
    plain_decode, prefix_decode = _decoder(plain, ids), _decoder(prefixed, ids)
    result = compare(plain_decode, {"prefix": prefix_decode}, warmup=5, repeats=repeats)
    return {
        "ratio": result["ratios"]["prefix"],
        "plain_ms_per_token": result["baseline"].median * 1e3 / DECODE_STEPS,
        "prefix_ms_per_token": result["candidates"]["prefix"].median * 1e3 / DECODE_STEPS,
    }


def merge_into_shared_prefix(figures: dict[int, dict[str, float]], results_dir: Path) -> Path:
    """Set ``ratios.decode_prefix_vs_plain[_<context>]`` and ``config.decode_ms`` in
    ``shared_prefix.json``, keeping every other key."""
    path = Path(results_dir) / "shared_prefix.json"
    document = json.loads(path.read_text())
    for context, values in figures.items():
        suffix = "" if context == CONTEXTS[0] else f"_{context}"
        document["ratios"][f"decode_prefix_vs_plain{suffix}"] = values["ratio"]
    document.setdefault("config", {})["decode_ms"] = {
        str(context): {k: v for k, v in values.items() if k != "ratio"}
        for context, values in figures.items()
    }
    document["config"]["decode_protocol"] = __doc__
    return atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    with torch_threads(1):
        figures = {context: measure(context, args.repeats) for context in CONTEXTS}
    for context, values in figures.items():
        print(context, {k: round(v, 4) for k, v in values.items()})
    merge_into_shared_prefix(figures, args.results_dir)
    return figures


if __name__ == "__main__":
    main()
