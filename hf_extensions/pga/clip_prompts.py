"""CoOp-style learnable prompts over a frozen ``transformers.CLIPModel`` (used by PGA).

Phan, Tran, Tran, Le, "Enhancing Domain Adaptation through Prompt Gradient Alignment", NeurIPS
2024 (arXiv 2406.09353), Sec. 3, following CoOp (Zhou et al., IJCV 2022) and DAPL (Ge et al.,
2022): the prompt of class ``k`` seen from domain ``d`` is

    [SOS] [θ_sh,k (n_ctx_shared vectors)] [θ_d (n_ctx_domain vectors)] [class name] . [EOS]

with ``θ_sh`` a class-specific (or one shared) domain-agnostic context and ``θ_d`` one context
per domain. Both encoders are frozen; the context tensors are the only trainable parameters.
Logits are CLIP's: ``exp(logit_scale) · cos(image feature, text feature)``.

The text tower is run on context *embeddings*: the placeholder words ``"X X ... X"`` of a
tokenised prompt are replaced by the context vectors, and the EOS position (pooling) still
comes from the token ids (the first EOS, as ``CLIPTextModel`` does).

Image features are a function of the frozen image tower only: :meth:`CLIPPromptLearner.
image_features` computes them once, and every loss of a training step reuses them (the official
PGA code recomputes them in each of its four passes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel
from transformers.masking_utils import create_causal_mask

from hf_extensions.models.tiny import CLIP_ZERO_SHOT_TEMPLATE
from hf_extensions.validation import check_integer, check_range, refuse

#: The zero-shot template of the paper (CLIP's ImageNet default; the zoo CLIP is measured with it).
ZERO_SHOT_TEMPLATE = CLIP_ZERO_SHOT_TEMPLATE
#: Placeholder word that a context vector replaces in the tokenised prompt.
PLACEHOLDER = "X"


def _eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """First EOS position of every row (``CLIPTextModel``'s pooling rule; pad may equal EOS)."""
    is_eos = input_ids == eos_token_id
    if not bool(is_eos.any(-1).all()):
        raise ValueError("every tokenised prompt must contain the EOS token (is it truncated?)")
    return is_eos.int().argmax(-1)


def encode_text_embeddings(
    clip: CLIPModel, inputs_embeds: torch.Tensor, eos_positions: torch.Tensor
) -> torch.Tensor:
    """Projected text features of ``inputs_embeds`` ``[N, L, d]`` (token embeddings, no
    position), pooled at ``eos_positions`` ``[N]``: the computation of
    ``CLIPModel.get_text_features`` with embeddings in place of ids."""
    text = clip.text_model
    hidden = text.embeddings(inputs_embeds=inputs_embeds)
    # Positional: the fourth parameter (no cache here) is `past_key_values` before transformers
    # 5.24 and `cache` from 5.24 on.
    mask = create_causal_mask(text.config, hidden, None, None)
    hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
    hidden = text.final_layer_norm(hidden.last_hidden_state)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_positions]
    return clip.text_projection(pooled)


def _projected(output) -> torch.Tensor:
    """``get_*_features`` return a tensor in transformers 4 and an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def check_clip_model(clip: nn.Module) -> None:
    """Refuse, naming it, a model that is not a two-tower ``transformers.CLIPModel``.

    The learner runs CLIP's text tower on context embeddings (token embeddings, causal mask,
    EOS pooling, ``text_projection``) and CLIP's image tower with ``get_image_features``: other
    dual encoders (SigLIP pools the last token, without EOS) and single towers
    (``CLIPTextModel``, ``CLIPVisionModel``) have other structures.

    Raises:
        ValueError: ``clip`` is not a ``CLIPModel`` (or a subclass).
    """
    if not isinstance(clip, CLIPModel):
        model_type = getattr(getattr(clip, "config", None), "model_type", None)
        raise ValueError(
            f"CLIPPromptLearner needs a transformers CLIPModel (both towers and their "
            f"projections); got {type(clip).__name__} (model_type {model_type!r}). Supported: "
            "CLIPModel checkpoints such as openai/clip-vit-base-patch16, or "
            "hf_extensions.models.tiny_clip(). Fix: load it with CLIPModel.from_pretrained(...)."
        )


def _check_context_fits(clip: CLIPModel, tokenizer, class_names, n_ctx: int) -> None:
    """The prompt ``BOS, n_ctx context tokens, class name, ".", EOS`` must fit CLIP's text
    positions (else the text tower fails deep inside its embeddings)."""
    limit = clip.config.text_config.max_position_embeddings
    longest = max(
        len(tokenizer(f"{name}.", add_special_tokens=False)["input_ids"]) for name in class_names
    )
    if n_ctx + longest + 2 > limit:
        refuse(
            "n_ctx_shared",
            f"such that `n_ctx_shared` + `n_ctx_domain` + the longest class name ({longest} "
            f"tokens with its '.') + 2 <= {limit}, CLIP's text context",
            f"{n_ctx} context tokens in all",
        )


class CLIPPromptLearner(nn.Module):
    """Learnable shared + per-domain prompt contexts over a frozen CLIP (PGA, Sec. 3).

    Args:
        clip: a ``transformers.CLIPModel``; frozen here (``requires_grad_(False)``, eval mode).
        tokenizer: its tokenizer.
        class_names: the ``K`` class names written into the prompts.
        domains: domain names, one context each (e.g. ``["source", "target"]``).
        n_ctx_shared / n_ctx_domain: context lengths (the paper: 16 and 16).
        class_specific_shared: ``θ_sh`` of shape ``[K, n_ctx_shared, d]`` (the paper) or one
            ``[n_ctx_shared, d]`` context for every class.
        init_std: contexts are drawn from ``N(0, init_std²)`` (the paper: 0.02).
        predict_domains: domains whose softmaxes :meth:`forward` averages when no ``domain`` is
            given (the paper's test prediction averages source and target prompts); all domains
            by default.

    Parameters: ``shared_ctx`` and ``domain_ctx[name]`` only; everything of ``clip`` is frozen.
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer,
        class_names: Sequence[str],
        domains: Sequence[str],
        *,
        n_ctx_shared: int = 16,
        n_ctx_domain: int = 16,
        class_specific_shared: bool = True,
        init_std: float = 0.02,
        predict_domains: Sequence[str] | None = None,
    ):
        super().__init__()
        if not class_names:
            refuse("class_names", "at least one class name", list(class_names))
        if len(set(domains)) != len(domains) or not domains:
            refuse("domains", "distinct names (at least one)", list(domains))
        check_integer("n_ctx_shared", n_ctx_shared, low=1)
        check_integer("n_ctx_domain", n_ctx_domain, low=1)
        check_clip_model(clip)
        _check_context_fits(clip, tokenizer, class_names, n_ctx_shared + n_ctx_domain)
        self.clip = clip.requires_grad_(False).eval()
        self.class_names = list(class_names)
        self.domains = list(domains)
        self.n_ctx_shared = n_ctx_shared
        self.n_ctx_domain = n_ctx_domain
        self.predict_domains = list(predict_domains or domains)
        width = clip.text_model.embeddings.token_embedding.embedding_dim
        num_classes = len(self.class_names)
        shape = (
            (num_classes, n_ctx_shared, width) if class_specific_shared else (n_ctx_shared, width)
        )
        device = clip.text_model.embeddings.token_embedding.weight.device
        self.shared_ctx = nn.Parameter(torch.randn(shape, device=device) * init_std)
        self.domain_ctx = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(n_ctx_domain, width, device=device) * init_std)
                for name in domains
            }
        )
        eos = clip.config.text_config.eos_token_id
        placeholders = " ".join([PLACEHOLDER] * (n_ctx_shared + n_ctx_domain))
        prompts = [f"{placeholders} {name}." for name in self.class_names]
        ids = tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
        ph_id = tokenizer(PLACEHOLDER, add_special_tokens=False)["input_ids"]
        if len(ph_id) != 1 or not bool(
            (ids[:, 1 : 1 + n_ctx_shared + n_ctx_domain] == ph_id[0]).all()
        ):
            raise ValueError("the tokenizer must map the placeholder word to one token per word")
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.register_buffer("prompt_eos", _eos_positions(ids, eos), persistent=False)
        zero_shot = tokenizer(
            [ZERO_SHOT_TEMPLATE.format(name) for name in self.class_names],
            padding=True,
            return_tensors="pt",
        )
        self.register_buffer("zero_shot_ids", zero_shot["input_ids"], persistent=False)
        self._tokenizer = tokenizer

    def train(self, mode: bool = True) -> CLIPPromptLearner:
        """Train mode for the prompts only: the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # -- parameters -------------------------------------------------------------------------

    def prompt_parameters(self, domain: str) -> list[nn.Parameter]:
        """``[θ_sh, θ_domain]``: the tensors the loss of ``domain`` depends on."""
        return [self.shared_ctx, self.domain_ctx[domain]]

    # -- features ---------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of the frozen image tower (no graph is kept)."""
        with torch.no_grad():
            features = _projected(self.clip.get_image_features(pixel_values=pixel_values))
        return F.normalize(features.float(), dim=-1)

    def text_features(self, domain: str) -> torch.Tensor:
        """L2-normalised text features ``[K, D]`` of the learned prompts of ``domain``."""
        if domain not in self.domain_ctx:
            raise KeyError(f"unknown domain {domain!r}; the prompt learner has {self.domains}")
        embedding = self.clip.text_model.embeddings.token_embedding
        tokens = embedding(self.prompt_ids)
        num_classes = tokens.shape[0]
        shared = self.shared_ctx
        if shared.dim() == 2:
            shared = shared.unsqueeze(0).expand(num_classes, -1, -1)
        own = self.domain_ctx[domain].unsqueeze(0).expand(num_classes, -1, -1)
        ctx = torch.cat([shared, own], dim=1).to(tokens.dtype)
        start, stop = 1, 1 + self.n_ctx_shared + self.n_ctx_domain
        embeds = torch.cat([tokens[:, :start], ctx, tokens[:, stop:]], dim=1)
        features = encode_text_embeddings(self.clip, embeds, self.prompt_eos)
        return F.normalize(features.float(), dim=-1)

    def zero_shot_text_features(self) -> torch.Tensor:
        """Normalised features of the hand-written prompts ``"a photo of a {class}."``."""
        with torch.no_grad():
            features = _projected(self.clip.get_text_features(input_ids=self.zero_shot_ids))
        return F.normalize(features.float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP logits ``exp(logit_scale) · image · textᵀ`` of normalised features."""
        return self.clip.logit_scale.exp().float() * image_features @ text_features.t()

    # -- losses and predictions -------------------------------------------------------------

    def domain_loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, domain: str
    ) -> torch.Tensor:
        """Cross-entropy of ``domain``'s prompts; labels ``-100`` (unconfident) are ignored and
        a batch with no labelled row gives a zero loss (still attached to the prompts)."""
        logits = self.logits(image_features, self.text_features(domain))
        kept = labels != -100
        per_row = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        return (per_row * kept).sum() / kept.sum().clamp_min(1)

    def predict_proba(
        self, pixel_values: torch.Tensor, domains: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Average over ``domains`` (default :attr:`predict_domains`) of the softmax of each
        domain's prompts (the paper's test prediction)."""
        image = self.image_features(pixel_values)
        probs = [
            self.logits(image, self.text_features(d)).softmax(-1)
            for d in (domains or self.predict_domains)
        ]
        return torch.stack(probs).mean(0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        domain: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"logits", "loss"?}`` for ``Trainer``: with ``domain``, that domain's CLIP logits;
        without, the log of :meth:`predict_proba` (so ``argmax`` is the averaged prediction)."""
        if domain is not None:
            logits = self.logits(self.image_features(pixel_values), self.text_features(domain))
        else:
            logits = self.predict_proba(pixel_values).clamp_min(1e-12).log()
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels, ignore_index=-100)
        return out

    @torch.no_grad()
    def zero_shot_proba(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP zero-shot class probabilities with ``"a photo of a {class}."``."""
        image = self.image_features(pixel_values)
        return self.logits(image, self.zero_shot_text_features()).softmax(-1)

    @torch.no_grad()
    def pseudo_labels(
        self, pixel_values: torch.Tensor, threshold: float = 0.4, batch_size: int = 256
    ) -> torch.Tensor:
        """Zero-shot labels, ``-100`` where the top probability is below ``threshold`` (the
        paper: 0.4). Computed once before training, as in the official code."""
        check_range("threshold", threshold, low=0.0, high=1.0)
        labels = []
        for start in range(0, pixel_values.shape[0], batch_size):
            probs = self.zero_shot_proba(pixel_values[start : start + batch_size])
            confidence, label = probs.max(-1)
            labels.append(torch.where(confidence >= threshold, label, torch.full_like(label, -100)))
        return torch.cat(labels)


def pretrain_clip_on_labels(
    clip: CLIPModel,
    tokenizer,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    *,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> CLIPModel:
    """Briefly train every weight of a (tiny, random) CLIP so that zero-shot prompts work.

    Not part of PGA: it stands in for CLIP's web pre-training in the offline setting. Each step
    is CLIP's image-to-text cross-entropy against the ``K`` texts ``"a photo of a {class}."``
    (the class texts are the candidates, so every image has one positive). Seeded; returns
    ``clip`` in eval mode.
    """
    # host: the offline fixture's pre-training, seeded the same on every device
    generator = torch.Generator().manual_seed(seed)
    texts = tokenizer(
        [ZERO_SHOT_TEMPLATE.format(name) for name in class_names],
        padding=True,
        return_tensors="pt",
    )["input_ids"]
    clip.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=learning_rate, weight_decay=0.0)
    for _ in range(steps):
        # host: indices from the host generator above
        index = torch.randint(0, pixel_values.shape[0], (batch_size,), generator=generator)
        image = F.normalize(_projected(clip.get_image_features(pixel_values=pixel_values[index])))
        text = F.normalize(_projected(clip.get_text_features(input_ids=texts)))
        logits = clip.logit_scale.exp() * image @ text.t()
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return clip.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- embedded default

#: Class names of the digits written as words (what the prompts and zero-shot texts say).
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def as_tensors(dataset, columns: Sequence[str] = ("pixel_values", "labels")) -> dict:
    """``{column: tensor}`` of a small in-memory ``datasets.Dataset``."""
    formatted = dataset.with_format("numpy")
    # host: a small in-memory data set, loaded on the host
    return {name: torch.as_tensor(np.asarray(formatted[name])) for name in columns}


def digit_domains(
    seed: int = 0, *, target_shift: str = "rotate", severity: float = 0.5, image_size: int = 16
):
    """The embedded domain-adaptation task: scikit-learn's digits (source) -> shifted digits
    (target, ``hf_extensions.data.shifted_domains``), RGB ``image_size`` pixels square for a
    tiny CLIP. Returns ``{"source": DatasetDict, "target": DatasetDict}`` with train /
    validation / test splits (target labels are for evaluation only)."""
    from hf_extensions.data import load_digits, shifted_domains

    data = load_digits(seed=seed, image_size=image_size, num_channels=3)
    return shifted_domains(
        data, {"source": "none", "target": target_shift}, severity=severity, seed=seed
    )
