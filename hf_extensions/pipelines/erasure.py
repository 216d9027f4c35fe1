"""Concept erasure with adversarial preservation (EAP), and ESD, as a diffusers pipeline modifier.

Bui, Vuong, Doan, Le, Montague, Abraham, Phung, "Erasing Undesirable Concepts in Diffusion
Models with Adversarial Preservation" (NeurIPS 2024, arXiv 2410.15618); ESD is Gandikota et
al., "Erasing Concepts from Diffusion Models" (ICCV 2023). ``erase_concepts(pipe, ["nudity"])``
fine-tunes one parameter group of ``pipe.unet`` and returns the same pipeline object (same class,
same other components) so that ``save_pretrained`` / ``push_to_hub`` / generation are unchanged.

One training cycle (paper Alg. 1; ``pgd_num_steps`` = 1 model step + the adversary steps):

1. draw a concept c_e to erase, a DDIM index i (uniform over ``ddim_steps``), one start noise;
   draw the adversarial concept c_a from the Gumbel adversary (EAP) or a fixed concept (fixed);
2. sample z_e and z_a by running the *edited* model with classifier-free guidance
   ``start_guidance`` over the scheduler's ``timesteps[:i]`` from the same noise, both concepts
   in one batch; the UNet is then queried at ``timesteps[i]``, whose ᾱ is used for x0;
3. model step: ``L = || ε_θ'(z_e, c_e) − [ε_θ(z_e, "") − η (ε_θ(z_e, c_e) − ε_θ(z_e, ""))] ||²
   + λ || ε_θ'(z_a, c_a) − ε_θ(z_a, c_a) ||²`` (paper Eq. 7; x0 space by default);
4. adversary steps: ascend ``|| ε_θ'(z_a, c_a) − ε_θ(z_a, c_a) ||²`` in the Gumbel logits with
   the updated θ' (straight-through, differentiated through both models by default).

Departures from the official ``train_adversarial_gumbel.py``, and why:

- z and t are paired exactly: the official (CompVis ESD) loop draws a DDIM index ``t_enc``
  uniform in ``[0, ddim_steps)``, runs its DDIM sampler from noise until the update at index
  ``t_enc − 1`` (``till_T``; ``t_enc`` 0 and 1 both run the full sampling), so z sits at the
  grid timestep ``ddim_timesteps[t_enc − 2]``, then queries the UNet at a DDPM timestep drawn
  uniformly in ``[1000 t_enc / ddim_steps, 1000 (t_enc + 1) / ddim_steps)`` and maps to x0 with
  ᾱ of ``ddim_timesteps[t_enc]``: the same end of the trajectory, but the query and ᾱ are about
  two grid steps noisier than z (and t is jittered within its grid cell). Here z is at
  ``timesteps[i]`` and so are the query and ᾱ; the noise levels are drawn uniformly over the
  same grid.
- The adversary's straight-through step differentiates the frozen model's ε_θ(z_a, c_a) in c_a
  too (``adversary_reference="differentiable"``, the gradient of the paper's L_preserve); the
  official code detaches it, which measurably finds the most damaged concept far more slowly
  (``adversary_reference="detached"`` keeps the official gradient).
- The adversary step reuses the cycle's draw (z_a, t, the Gumbel noise) instead of drawing and
  sampling everything again: the two samplings and the frozen forwards of the model step run
  once per cycle (the official loop runs them for every model and every adversary step, ~4x an
  ESD step). z carries no gradient, as officially.
- z_e and z_a are sampled in one batch (the official code runs two sampling loops; the same
  start noise is used for both, as there).
- Several erased concepts: one adversary (candidate set, logits) per concept, as officially.
- Data-parallel (Accelerate) and gradient accumulation: every cycle of a step's global batch
  draws from its own seeded generator (:meth:`ConceptEraser.cycle_generator`), UNet gradients
  are averaged by DDP / accumulation, and the adversary takes its steps after the model step
  on the mean logit gradient over all the step's cycles (``accelerator.reduce``): N processes
  with accumulation A give the 1-process run with accumulation N·A (tested with 2 processes).
  With accumulation, the official one-adversary-step-per-cycle becomes one per model step.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_extensions.checkpoints import resolve_checkpoint
from hf_extensions.distributed import require_process_group
from hf_extensions.pipelines import erasure_checkpoints
from hf_extensions.pipelines.adversary import CandidateSet, GumbelAdversary, select_candidates
from hf_extensions.pipelines.config import CHECKPOINT_FIELDS, ErasureConfig
from hf_extensions.pipelines.parameter_groups import set_trainable
from hf_extensions.pipelines.vocabulary import common_words
from hf_extensions.seeding import keyed_generator
from hf_extensions.validation import check_choice, check_integer, refuse

__all__ = [
    "ConceptEraser",
    "ErasureResult",
    "LatentSampler",
    "check_erasure_pipeline",
    "encode_prompts",
    "erase_concepts",
    "erasure_target",
    "evaluate_erasure",
    "prediction_loss",
]

METHOD = "eap-concept-erasure"
PAPER = "Erasing Undesirable Concepts in Diffusion Models with Adversarial Preservation"
ARXIV_ID = "2410.15618"


# ----------------------------------------------------------------------------- building blocks


#: What erasure supports, for error messages.
SUPPORTED_PIPELINES = (
    "Stable Diffusion 1.x/2.x-style text-to-image pipelines (epsilon, v_prediction or sample "
    "UNets, read from scheduler.config.prediction_type): `unet` (a UNet2DConditionModel "
    "conditioned only on the hidden states of one `text_encoder`: addition_embed_type, "
    "class_embed_type and encoder_hid_dim_type None), `tokenizer` and `scheduler`; not SDXL "
    "(addition_embed_type='text_time', a second text encoder) nor transformer-based pipelines"
)
#: UNet config keys that add a conditioning input this loop does not provide (SDXL's
#: ``"text_time"``, Kandinsky's ``"image"``, class labels, image-projected hidden states).
_EXTRA_CONDITIONING = ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type")


_REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
_PIPELINE_KEYS = (*_REQUIRED, "text_encoder_2")


def _component(pipe, key: str):
    """``pipe.<key>``, or ``None`` when absent (a removed diffusers component reads back as its
    config entry, a ``(library, class)`` pair)."""
    if hasattr(type(pipe), "register_modules"):  # a DiffusionPipeline: components live here
        value = vars(pipe).get(key)  # (getattr would read a deleted one from the config)
    else:
        value = getattr(pipe, key, None)
    return None if isinstance(value, (tuple, list)) else value


def check_erasure_pipeline(pipe) -> None:
    """Refuse, before anything runs, a pipeline the erasure loop cannot drive.

    The loop calls ``pipe.unet(latents, t, encoder_hidden_states=text_encoder(ids)[0])`` and
    nothing else (see :data:`SUPPORTED_PIPELINES`).

    Raises:
        ValueError: a component is missing (e.g. a DiT/Flux pipeline has a ``transformer``, no
            ``unet``), the UNet is not a ``UNet2DConditionModel`` or takes extra conditioning
            (SDXL: ``addition_embed_type="text_time"``), the pipeline has a second text encoder,
            or the UNet's ``cross_attention_dim`` differs from the text encoder's width.
    """
    from diffusers import UNet2DConditionModel

    name = type(pipe).__name__
    fix = f"Supported: {SUPPORTED_PIPELINES}."
    components = {key: _component(pipe, key) for key in _PIPELINE_KEYS}
    missing = [key for key, value in components.items() if value is None and key in _REQUIRED]
    if missing:
        present = sorted(k for k in getattr(pipe, "components", None) or {} if _component(pipe, k))
        raise ValueError(
            f"concept erasure does not support {name}: it has no {missing} (its components: "
            f"{present}). {fix}"
        )
    unet, text_encoder = components["unet"], components["text_encoder"]
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(
            f"concept erasure does not support {name}: its unet is a {type(unet).__name__}, not "
            f"a UNet2DConditionModel. {fix}"
        )
    extra = {key: unet.config.get(key) for key in _EXTRA_CONDITIONING if unet.config.get(key)}
    if extra or components.get("text_encoder_2") is not None:
        extra = extra or {"text_encoder_2": type(components["text_encoder_2"]).__name__}
        raise ValueError(
            f"concept erasure does not support {name}: its UNet takes conditioning besides one "
            f"text encoder's hidden states ({extra}); the erasure loop calls the UNet with "
            "encoder_hidden_states only (no added_cond_kwargs: SDXL's pooled text_embeds and "
            "time_ids). Fix: erase from a Stable Diffusion 1.x/2.x pipeline "
            f"(StableDiffusionPipeline; v-prediction 2.x UNets are supported). {fix}"
        )
    width = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    cross = unet.config.get("cross_attention_dim")
    if isinstance(width, int) and isinstance(cross, int) and width != cross:
        raise ValueError(
            f"concept erasure does not support {name}: the text encoder "
            f"({type(text_encoder).__name__}) outputs width {width} but the UNet's "
            f"cross_attention_dim is {cross}; the two must come from the same model. {fix}"
        )


@torch.no_grad()
def encode_prompts(
    pipe, prompts: Sequence[str], device: torch.device | None = None, batch_size: int = 64
) -> torch.Tensor:
    """The text encoder's last hidden states ``[N, L, D]`` (what the UNet is conditioned on).

    Prompts are padded to the tokenizer's ``model_max_length`` like the pipeline does.
    """
    device = device or pipe.text_encoder.device
    tokenizer = pipe.tokenizer
    outputs = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(pipe.text_encoder.device)
        outputs.append(pipe.text_encoder(ids)[0].to(device))
    return torch.cat(outputs)


def erasure_target(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, negative_guidance: float
) -> torch.Tensor:
    """ESD's negatively guided target ``ε(z, "") − η (ε(z, c) − ε(z, ""))`` (Gandikota Eq. 4)."""
    return eps_uncond - negative_guidance * (eps_cond - eps_uncond)


#: UNet targets the loss converts (the scheduler config's ``prediction_type``).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    latents: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    loss_space: str = "x0",
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Mean squared error of two UNet outputs at ``latents``, in ε or in x0 space.

    The outputs are first read as what the UNet predicts (``prediction_type``, with
    ``z = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε``, α = sqrt(ᾱ), σ = sqrt(1 − ᾱ)): ``epsilon``;
    ``v_prediction`` (v = α ε − σ x0, Salimans & Ho 2022: SD 2.x), giving ε = α v + σ z and
    x0 = α z − σ v; ``sample`` (x0 itself), giving ε = (z − α x0)/σ. x0 space (the official
    code) compares ``X(z, ε) = (z − σ ε)/α``, which equals the ε-space MSE times ``(1 − ᾱ)/ᾱ``
    (so it weights noisy timesteps up), whatever the UNet predicts. ``alpha_bar`` is a number or
    one value per sample.
    """
    check_choice("loss_space", loss_space, ("x0", "epsilon"))
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float32, device=latents.device)
    if alpha_bar.ndim == 1:
        alpha_bar = alpha_bar.view(-1, *([1] * (latents.ndim - 1)))
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    z = latents.float()

    def convert(output: torch.Tensor) -> torch.Tensor:
        output = output.float()
        if prediction_type == "v_prediction":  # linear in v, finite at ᾱ = 0 (zero SNR)
            return alpha * z - sigma * output if loss_space == "x0" else alpha * output + sigma * z
        if prediction_type == "sample":
            return output if loss_space == "x0" else (z - alpha * output) / sigma
        return (z - sigma * output) / alpha if loss_space == "x0" else output

    return torch.nn.functional.mse_loss(convert(prediction), convert(target))


def prediction_type_of(pipe) -> str:
    """What ``pipe.unet`` predicts, from the scheduler config (diffusers' convention)."""
    value = pipe.scheduler.config.get("prediction_type", "epsilon")
    if value not in PREDICTION_TYPES:
        refuse(
            "scheduler.config.prediction_type",
            f"one of {PREDICTION_TYPES} (concept erasure converts these to its ε / x0 loss); "
            "fix: load the pipeline with the scheduler its UNet was trained with",
            value,
        )
    return value


def _eps(unet, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's raw output (ε, v or x0: its ``prediction_type``). Guidance and the ESD target
    combine outputs with weights summing to 1, which commutes with the affine maps to ε and x0
    at the same z, so they are formed on raw outputs; :func:`prediction_loss` converts."""
    cond = cond.to(latents.dtype)
    return unet(latents, timestep, encoder_hidden_states=cond, return_dict=False)[0]


class LatentSampler:
    """Samples z at ``timesteps[i]`` of a DDIM grid by running ``timesteps[:i]`` from noise.

    The grid is ``DDIMScheduler.from_config(pipe.scheduler.config)`` with ``ddim_steps``
    inference steps (eta 0), whatever scheduler the pipeline uses: after ``i`` DDIM updates
    from pure noise (``i = 0``: none) the latents are at ``timesteps[i]``, which is where the
    UNet must be queried and whose ``ᾱ`` maps ε to x0. With ``i = ddim_steps`` the loop is
    the pipeline's own full sampling.
    """

    def __init__(self, scheduler_config: Any, ddim_steps: int) -> None:
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(ddim_steps)
        self.timesteps = self.scheduler.timesteps.clone()
        self.ddim_steps = ddim_steps

    def timestep(self, i: int) -> torch.Tensor:
        return self.timesteps[i]

    def alpha_bar(self, i: int) -> torch.Tensor:
        return self.scheduler.alphas_cumprod[int(self.timesteps[i])]

    @torch.no_grad()
    def sample(
        self,
        unet,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        noise: torch.Tensor,
        i: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Latents after ``timesteps[:i]`` with guidance, for a batch of conditions ``[B, L, D]``."""
        check_integer("i", i, low=0, high=self.ddim_steps)
        batch = cond.shape[0]
        conditions = torch.cat([uncond.expand(batch, *uncond.shape[-2:]), cond])
        latents = noise * self.scheduler.init_noise_sigma
        for t in self.timesteps[:i]:
            both = _eps(unet, torch.cat([latents, latents]), t, conditions)
            eps_uncond, eps_cond = both.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents, eta=0.0, return_dict=False)[0]
        return latents


# ----------------------------------------------------------------------------- the loop


@dataclass
class ErasureResult:
    """What an erasure did; kept on the pipeline as ``pipe.erasure_result``.

    ``adversarial_concepts``: per erased concept, the adversary's final argmax word, the
    words it chose most often and the final ``softmax(logits)`` by candidate; ``metrics``: measured figures (see :func:`evaluate_erasure`).
    """

    method: str
    concepts: list[str]
    config: dict[str, Any]
    trained_parameters: list[str]
    adversarial_concepts: dict[str, dict[str, Any]] = field(default_factory=dict)
    candidates: dict[str, list[str]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class ConceptEraser:
    """The training state of one erasure; :meth:`step` runs one model step (its
    ``gradient_accumulation_steps`` cycles) and then the adversary steps.

    Use :func:`erase_concepts` unless you need the steps one by one (the benchmark times them);
    :meth:`finish` puts the edited UNet back into the pipeline. Building the eraser moves
    ``pipe.unet`` and ``pipe.text_encoder`` to the accelerator's device, keeps a frozen copy of
    the UNet, makes exactly ``config.parameter_group`` trainable and, for ``"eap"``, selects each
    concept's candidate words.

    Args:
        pipe (`StableDiffusionPipeline`):
            A diffusers text-to-image pipeline with ``unet``, ``text_encoder``, ``tokenizer`` and
            ``scheduler`` components; its UNet is edited in place.
        concepts (`str` or `Sequence[str]`):
            The concept(s) to erase, as prompts (e.g. ``"nudity"``, ``"Van Gogh"``); a single
            string is one concept. Each cycle draws one of them uniformly.
        method (`str`, *optional*, defaults to `"eap"`):
            ``"eap"`` (adversarial preservation), ``"esd"`` (no preservation: the config's
            ``preservation_weight`` is set to 0) or ``"fixed"`` (preserve one of
            ``config.preserve_concepts``, drawn uniformly, instead of an adversarial concept).
        config (`ErasureConfig`, *optional*, defaults to `None`):
            The hyper-parameters; `None` uses ``ErasureConfig()`` (the paper's defaults).
        accelerator (`accelerate.Accelerator`, *optional*, defaults to `None`):
            An existing accelerator to run under, used as it is. `None` creates one with the
            config's ``gradient_accumulation_steps`` and ``mixed_precision`` (`None` there: the
            launcher's, e.g. ``accelerate launch --mixed_precision bf16``).
        extra_candidates (`Mapping[str, torch.Tensor]`, *optional*, defaults to `None`):
            Name -> text-encoder output ``[L, D]`` (e.g. a learned token's prompt embedding),
            added to every concept's selected candidate words (``"eap"`` only; ignored by the
            other methods). A name must not be one of the selected words.

    Raises:
        ValueError: ``concepts`` is empty or holds an empty string, ``method`` is not one of
            ``("eap", "esd", "fixed")``, the parameter group selects no parameter of this UNet,
            or an ``extra_candidates`` entry clashes with a word or has the wrong shape.
    """

    def __init__(
        self,
        pipe,
        concepts: Sequence[str] | str,
        method: str = "eap",
        config: ErasureConfig | None = None,
        accelerator=None,
        extra_candidates: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin

        check_erasure_pipeline(pipe)
        config = (config or ErasureConfig()).for_method(method)
        if isinstance(concepts, str):
            concepts = [concepts]
        concepts = [c for c in concepts]
        if not concepts or any(not isinstance(c, str) or not c.strip() for c in concepts):
            refuse("concepts", "one or more non-empty strings", concepts)
        self.pipe, self.method, self.config, self.concepts = pipe, method, config, concepts
        # The loop has no dataloader: accumulation must not follow one. Accelerate's gradient
        # state is shared by the process, and a dataloader a Trainer left mid-epoch (max_steps)
        # stays "at its end", which synced every cycle of a later erasure in the same process.
        plugin = GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        )
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_plugin=plugin, mixed_precision=config.mixed_precision
        )
        acc = self.accelerator
        require_process_group(acc.num_processes, "ConceptEraser")
        self.device = acc.device

        pipe.text_encoder.to(self.device)
        unet = pipe.unet.to(self.device)
        self.frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        self.trained_parameters = set_trainable(unet, config.parameter_group)
        self.uncond = encode_prompts(pipe, [""], self.device)[0]
        self.concept_embeddings = encode_prompts(pipe, concepts, self.device)
        self.preserve_embeddings = encode_prompts(pipe, config.preserve_concepts, self.device)
        self.sampler = LatentSampler(pipe.scheduler.config, config.ddim_steps)
        self.prediction_type = prediction_type_of(pipe)
        self.latent_shape = _latent_shape(pipe, config)

        self.adversaries: list[GumbelAdversary] = []
        self.choices: list[Counter] = [Counter() for _ in concepts]
        if method == "eap":
            words = config.candidates or common_words()
            prompts = [config.candidate_template.format(word) for word in words]
            word_embeddings = encode_prompts(pipe, prompts, self.device)
            for concept, embedding in zip(concepts, self.concept_embeddings):
                chosen = select_candidates(
                    concept,
                    embedding,
                    words,
                    word_embeddings,
                    config.k_closest,
                    config.num_centers,
                    config.seed,
                    config.exclude_target,
                )
                index = {word: n for n, word in enumerate(words)}
                # host: index rows, once at set-up; moved to the embeddings' device next
                rows = torch.tensor([index[word] for word in chosen.words])
                candidate_embeddings = word_embeddings[rows.to(word_embeddings.device)]
                if extra_candidates:
                    chosen, candidate_embeddings = _with_extra_candidates(
                        chosen, candidate_embeddings, embedding, extra_candidates
                    )
                self.adversaries.append(
                    GumbelAdversary(
                        chosen,
                        candidate_embeddings,
                        config.gumbel_temperature,
                        config.gumbel_hard,
                    ).to(self.device)
                )
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        self.adversary_optimizer = (
            torch.optim.Adam([a.logits for a in self.adversaries], lr=config.adversary_lr)
            if self.adversaries
            else None
        )
        self.losses: list[float] = []
        self.steps_done = 0

    def set_candidates(
        self, index: int, candidates: CandidateSet, embeddings: torch.Tensor
    ) -> None:
        """Replace the adversary of ``concepts[index]`` (e.g. with embeddings of your own)."""
        config = self.config
        self.adversaries[index] = GumbelAdversary(
            candidates, embeddings.to(self.device), config.gumbel_temperature, config.gumbel_hard
        ).to(self.device)
        self.choices[index] = Counter()
        self.adversary_optimizer = torch.optim.Adam(
            [a.logits for a in self.adversaries], lr=config.adversary_lr
        )

    @property
    def candidate_sets(self) -> list[CandidateSet]:
        return [adversary.candidates for adversary in self.adversaries]

    def cycle_generator(self, micro: int) -> torch.Generator:
        """The RNG of micro-cycle ``micro`` of the current step on this process.

        Cycles are numbered over the global batch, ``(step × accumulation + micro) × processes
        + rank``, and each draws (concept, DDIM index, noise, Gumbel noise) from its own seeded
        generator: N processes with accumulation A draw exactly the cycles that one process with
        accumulation N·A draws, so data-parallel runs reproduce the 1-process run.
        """
        acc = self.accelerator
        accumulation = self.config.gradient_accumulation_steps
        index = (self.steps_done * accumulation + micro) * acc.num_processes
        index += acc.process_index
        return keyed_generator(self.config.seed, index)

    def step(self) -> float:
        """One model step over ``gradient_accumulation_steps`` cycles, then the adversary steps
        on the same cycles; returns the mean model loss of this process."""
        total, pending = 0.0, []
        for micro in range(self.config.gradient_accumulation_steps):
            loss, work = self._cycle(self.cycle_generator(micro))
            total += loss
            if work is not None:
                pending.append(work)
        if self.adversaries:
            self._adversary_update(pending)
        self.steps_done += 1
        loss = total / self.config.gradient_accumulation_steps
        self.losses.append(loss)
        return loss

    def _cycle(self, generator: torch.Generator):
        config, acc = self.config, self.accelerator

        def randint(high: int) -> int:
            # host: every cycle draws from its own seeded host generator, so 1 or N processes agree
            return int(torch.randint(high, (1,), generator=generator))

        preserve = config.preservation_weight > 0
        e = randint(len(self.concepts))
        i = randint(config.ddim_steps)
        t = self.sampler.timestep(i).to(self.device)
        alpha_bar = self.sampler.alpha_bar(i)
        # host: as above: drawn on the host, copied once per cycle
        noise = torch.randn(self.latent_shape, generator=generator).to(self.device)
        c_e = self.concept_embeddings[e]
        conds = [c_e]
        adversary = gumbel = None
        draws: list[torch.Tensor] = []
        if self.adversaries:  # the adversary also runs at λ = 0 (then it only watches)
            adversary = self.adversaries[e]
            # Two draws for the score-function estimator (leave-one-out baseline), one else.
            for _ in range(2 if config.adversary_estimator == "score_function" else 1):
                with torch.no_grad():
                    weights, c_a, gumbel = adversary.sample(generator)
                self.choices[e][adversary.candidates.words[int(weights.argmax())]] += 1
                draws.append(weights)
                conds.append(c_a)
        elif preserve:
            conds.append(self.preserve_embeddings[randint(len(self.preserve_embeddings))])
        conds_t = torch.stack(conds)
        edited = acc.unwrap_model(self.unet)
        with acc.autocast(), torch.no_grad():
            latents = self.sampler.sample(
                edited,
                conds_t,
                self.uncond,
                noise.expand(len(conds), *noise.shape[1:]),
                i,
                config.start_guidance,
            )
            frozen_in = torch.cat([latents[:1], latents])
            frozen_cond = torch.cat([self.uncond[None], conds_t])
            frozen_out = _eps(self.frozen, frozen_in, t, frozen_cond).float()
        target = erasure_target(frozen_out[0:1], frozen_out[1:2], config.negative_guidance)
        with acc.accumulate(self.unet):
            with acc.autocast():
                prediction = _eps(self.unet, latents, t, conds_t).float()
            loss = prediction_loss(
                prediction[0:1],
                target,
                latents[0:1],
                alpha_bar,
                config.loss_space,
                self.prediction_type,
            )
            preserve_losses = [
                prediction_loss(
                    prediction[n : n + 1],
                    frozen_out[n + 1 : n + 2],
                    latents[n : n + 1],
                    alpha_bar,
                    config.loss_space,
                    self.prediction_type,
                )
                for n in range(1, len(conds))
            ]
            if preserve and preserve_losses:
                loss = loss + config.preservation_weight * sum(preserve_losses) / len(
                    preserve_losses
                )
            acc.backward(loss)
            if acc.sync_gradients and config.max_grad_norm is not None:
                acc.clip_grad_norm_(self.unet.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        work = None
        if adversary is not None and config.adversary_estimator == "score_function":
            values = [float(value.detach()) for value in preserve_losses]
            work = (e, lambda: self._score_function_gradient(adversary, draws, values))
        elif adversary is not None:
            args = (adversary, gumbel, latents[1:], t, alpha_bar, frozen_out[2:])
            work = (e, lambda: self._straight_through_gradient(*args))
        return float(loss.detach()), work

    def _adversary_update(self, pending) -> None:
        """``pgd_num_steps − 1`` Adam steps of the logits, each on the mean gradient over the
        step's cycles (all processes: one ``reduce``), so that the adversary sees the model
        step's global batch however it is split over processes and accumulation."""
        acc = self.accelerator
        for _ in range(self.config.pgd_num_steps - 1):
            sums = [torch.zeros_like(a.logits) for a in self.adversaries]
            counts = torch.zeros(len(self.adversaries), device=self.device)
            for index, gradient in pending:
                sums[index] += gradient()
                counts[index] += 1
            flat = torch.cat([*sums, counts.to(sums[0].dtype)])
            if acc.num_processes > 1:
                flat = acc.reduce(flat, reduction="sum")
            *sums, counts = flat.split([*(len(s) for s in sums), len(self.adversaries)])
            self.adversary_optimizer.zero_grad(set_to_none=True)
            # host: once per step: adversaries no cycle drew keep their Adam state untouched
            for adversary, total, count in zip(self.adversaries, sums, counts.tolist()):
                if count > 0:  # an adversary no cycle drew keeps its Adam state untouched
                    adversary.logits.grad = total / count
            self.adversary_optimizer.step()

    def _straight_through_gradient(
        self, adversary, gumbel, latents, t, alpha_bar, frozen_pred
    ) -> torch.Tensor:
        """Gradient of −L_preserve in the logits at a cycle's draw (z_a, t, Gumbel noise).

        The draw is redone with the same Gumbel noise through the current logits (the
        straight-through gradient needs the graph); its hard sample is the one z_a was
        sampled with until the logits move (then later steps use the new argmax at z_a).

        ``adversary_reference="differentiable"`` (default) differentiates both sides of
        ``L_preserve(c) = || ε_θ'(z, c) − ε_θ(z, c) ||²`` in c (one more frozen forward and
        backward); ``"detached"`` is the official code (``e_r_org`` under ``no_grad``), whose
        gradient ``2 (ε' − ε) ∂ε'/∂c`` omits ``− 2 (ε' − ε) ∂ε/∂c``. For a small edit the two
        Jacobians nearly cancel in the exact gradient, so the omitted term dominates the
        official one while the edit is small (measured on the tiny pipeline after 80 steps, a
        planted near-copy of the target among 21 candidates: the detached gradient's sign on the
        near-copy's logit is positive on 46% of 48 draws, the exact one on 100%; the detached
        run leaves the near-copy below uniform probability, the exact one makes it the argmax;
        by the paper's 1000 steps the detached gradient gets there too).
        """
        config, acc = self.config, self.accelerator
        edited = acc.unwrap_model(self.unet)
        differentiable = config.adversary_reference == "differentiable"
        _, c_a, _ = adversary.sample(noise=gumbel)
        with acc.autocast():
            prediction = _eps(edited, latents, t, c_a[None]).float()
            if differentiable:  # ε_θ(z_a, c_a) with its graph to c_a (θ stays frozen)
                frozen_pred = _eps(self.frozen, latents, t, c_a[None]).float()
        objective = prediction_loss(
            prediction, frozen_pred, latents, alpha_bar, config.loss_space, self.prediction_type
        )
        (grad,) = torch.autograd.grad(-objective, adversary.logits)
        return grad

    def _score_function_gradient(self, adversary, draws, values: list[float]) -> torch.Tensor:
        """REINFORCE ascent of E[L_preserve] over Gumbel-max draws (option, not the paper's).

        A hard draw ``argmax(π + g)`` is a sample of ``softmax(π)``, so with two independent
        draws ``∇_π E[L] = ½ E[(L₁ − L₂)(y₁ − p) + (L₂ − L₁)(y₂ − p)]`` (the leave-one-out
        baseline: each draw's loss is compared with the other's at the same z noise and t, which
        removes the large variance of L over t). L are the preservation losses the model step
        already computed (both draws are sampled and preserved in the same batch), so the
        adversary step costs no UNet forward. Unlike the straight-through gradient it does not
        linearise L between the candidates' embeddings.
        """
        (y1, y2), (l1, l2) = draws, values
        probs = torch.softmax(adversary.logits.detach(), dim=0)
        ascent = 0.5 * (l1 - l2) * ((y1 - probs) - (y2 - probs))
        return -ascent / max(abs(l1) + abs(l2), 1e-30)  # scale-free: Adam sees the sign

    def finish(self):
        """Put the edited UNet back into the pipeline (eval mode, no grads); record the result."""
        acc = self.accelerator
        unet = acc.unwrap_model(self.unet)
        unet.requires_grad_(False).eval()
        self.pipe.unet = unet
        adversarial = {}
        for concept, adversary, counts in zip(self.concepts, self.adversaries, self.choices):
            adversarial[concept] = {
                "argmax": adversary.argmax_word(),
                "most_chosen": [word for word, _ in counts.most_common(5)],
                "probabilities": adversary.probabilities(),
            }
        self.pipe.erasure_result = ErasureResult(
            method=self.method,
            concepts=list(self.concepts),
            config={k: v for k, v in self.config.to_dict().items() if k not in CHECKPOINT_FIELDS},
            trained_parameters=list(self.trained_parameters),
            adversarial_concepts=adversarial,
            candidates={a.candidates.target: list(a.candidates.words) for a in self.adversaries},
            losses=list(self.losses),
        )
        return self.pipe


def _with_extra_candidates(
    chosen: CandidateSet,
    embeddings: torch.Tensor,
    target: torch.Tensor,
    extra: Mapping[str, torch.Tensor],
) -> tuple[CandidateSet, torch.Tensor]:
    """Append ``extra`` (name -> text-encoder output ``[L, D]``) to selected candidates."""
    names = list(extra)
    if any(name in chosen.words for name in names):
        refuse("extra_candidates", "names that are not among the selected words", names)
    rows = []
    for name in names:
        # host: user-given embeddings, once at set-up
        value = torch.as_tensor(extra[name]).to(embeddings)
        if value.shape != embeddings.shape[1:]:
            raise ValueError(
                f"`extra_candidates[{name!r}]` must have the text encoder's output shape "
                f"{tuple(embeddings.shape[1:])}, got {tuple(value.shape)}."
            )
        rows.append(value)
    extra_rows = torch.stack(rows)
    # host: candidate report, once at set-up
    distances = (extra_rows - target.to(extra_rows)).flatten(1).double().norm(dim=1).tolist()
    candidates = CandidateSet(
        target=chosen.target,
        words=[*chosen.words, *names],
        distances=[*chosen.distances, *distances],
        closest=list(chosen.closest),
    )
    return candidates, torch.cat([embeddings, extra_rows])


def _latent_shape(pipe, config: ErasureConfig) -> tuple[int, int, int, int]:
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample_size = pipe.unet.config.sample_size
    height = (config.height // scale) if config.height else sample_size
    width = (config.width // scale) if config.width else sample_size
    return (1, pipe.unet.config.in_channels, height, width)


def erase_concepts(
    pipe,
    concepts: Sequence[str] | str,
    method: str = "eap",
    config: ErasureConfig | None = None,
    accelerator=None,
    extra_candidates: Mapping[str, torch.Tensor] | None = None,
):
    """Erase ``concepts`` from ``pipe``'s UNet; return the same pipeline, edited in place.

    The UNet's ``config.parameter_group`` trains for ``config.num_steps`` model steps under
    Accelerate (gradient accumulation, mixed precision, data parallel: launch the script with
    ``accelerate launch``); the other components keep their weights. A progress bar shows the
    loss and the first concept's current adversarial word (``config.progress_bar``, local main
    process only). With ``config.save_steps`` a checkpoint is written every that many steps to
    ``config.checkpoint_dir``; ``config.resume_from_checkpoint`` (``"last"`` or a folder)
    resumes an interrupted erasure exactly (see :mod:`hf_extensions.pipelines.erasure_checkpoints`).

    Args:
        pipe (`StableDiffusionPipeline`):
            A diffusers text-to-image pipeline with ``unet``, ``text_encoder``, ``tokenizer`` and
            ``scheduler`` components (any scheduler: z is sampled on a DDIM grid built from its
            config). Its UNet and text encoder are moved to the accelerator's device.
        concepts (`str` or `Sequence[str]`):
            The concept(s) to erase, as prompts (e.g. ``"nudity"``, ``"Van Gogh"``); a single
            string is one concept. Each cycle draws one of them uniformly.
        method (`str`, *optional*, defaults to `"eap"`):
            ``"eap"``: Bui et al. 2024 (adversarial preservation); ``"esd"``: Gandikota et al.
            2023 (EAP with preservation weight 0); ``"fixed"``: ESD plus the preservation of a
            fixed concept drawn from ``config.preserve_concepts``.
        config (`ErasureConfig`, *optional*, defaults to `None`):
            The hyper-parameters; `None` uses ``ErasureConfig()`` (the paper's defaults).
        accelerator (`accelerate.Accelerator`, *optional*, defaults to `None`):
            An existing accelerator to run under, used as it is. `None` creates one with the
            config's ``gradient_accumulation_steps`` and ``mixed_precision`` (`None`, the
            default: the launcher's, ``ACCELERATE_MIXED_PRECISION``); Accelerate keeps one
            state per process, so pass one to run inside a script that already made one (or to
            erase a second time with another ``mixed_precision``).
        extra_candidates (`Mapping[str, torch.Tensor]`, *optional*, defaults to `None`):
            Name -> text-encoder output ``[L, D]`` (e.g. a learned token's prompt embedding),
            added to the adversary's selected words for every erased concept (``"eap"`` only;
            ignored by the other methods). A name must not be one of the selected words.

    Returns:
        `StableDiffusionPipeline`: ``pipe`` itself, with the edited UNet (eval mode, no
        gradients) and ``pipe.erasure_result``, an :class:`ErasureResult` (trained parameter
        names, adversarial concepts found, losses). Save it with ``pipe.save_pretrained`` or
        :func:`hf_extensions.pipelines.save_erased`.

    Raises:
        ValueError: ``concepts`` is empty or holds an empty string, ``method`` is not one of
            ``("eap", "esd", "fixed")``, the parameter group selects no parameter of this UNet,
            or an ``extra_candidates`` entry clashes with a word or has the wrong shape.
    """
    from tqdm.auto import tqdm

    eraser = ConceptEraser(pipe, concepts, method, config, accelerator, extra_candidates)
    config = eraser.config
    checkpoint = resolve_checkpoint(
        config.resume_from_checkpoint,
        config.checkpoint_dir or "",
        erasure_checkpoints.checkpoint_problem,
    )
    if checkpoint is not None:
        erasure_checkpoints.load_checkpoint(eraser, checkpoint)
    disable = not config.progress_bar or not eraser.accelerator.is_local_main_process
    steps = range(eraser.steps_done, config.num_steps)
    bar = tqdm(
        steps,
        desc=f"erase ({method})",
        total=config.num_steps,
        initial=steps.start,
        disable=disable,
    )
    for _ in bar:
        loss = eraser.step()
        postfix = {"loss": f"{loss:.4g}"}
        if eraser.adversaries:
            postfix["c_a"] = eraser.adversaries[0].argmax_word()
        bar.set_postfix(postfix)
        if config.save_steps and eraser.steps_done % config.save_steps == 0:
            erasure_checkpoints.save_checkpoint(
                eraser, config.checkpoint_dir, config.save_total_limit
            )
    return eraser.finish()


# ----------------------------------------------------------------------------- measurement


@torch.no_grad()
def evaluate_erasure(
    pipe,
    original_unet,
    concepts: Sequence[str],
    preserved: Sequence[str] = (),
    heldout: Sequence[str] = (),
    num_samples: int = 8,
    ddim_steps: int = 10,
    start_guidance: float = 3.0,
    negative_guidance: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Erasure strength and drift of an edited ``pipe.unet`` against ``original_unet``.

    For every prompt, ``num_samples`` fixed draws (noise, DDIM index) give latents sampled by the
    *original* model with guidance (so the evaluation points do not depend on the edit), and the
    ε predictions are compared at those points, in ε space. Latents have the UNet's
    ``sample_size``; everything runs on ``original_unet``'s device.

    Args:
        pipe (`StableDiffusionPipeline`):
            The pipeline whose ``unet`` is the edited one (e.g. returned by
            :func:`erase_concepts`); its text encoder encodes the prompts.
        original_unet (`UNet2DConditionModel`):
            The UNet before the edit (e.g. ``copy.deepcopy(pipe.unet)`` taken before erasing), on
            the same device as ``pipe.unet``.
        concepts (`Sequence[str]`):
            The erased concepts, as prompts.
        preserved (`Sequence[str]`, *optional*, defaults to `()`):
            Prompts that should be unchanged (e.g. the adversary's candidate words); empty: no
            ``preserved_drift``.
        heldout (`Sequence[str]`, *optional*, defaults to `()`):
            Further prompts that should be unchanged and that the erasure never saw; empty: no
            ``heldout_drift``.
        num_samples (`int`, *optional*, defaults to `8`):
            Evaluation points (noise, DDIM index) per prompt.
        ddim_steps (`int`, *optional*, defaults to `10`):
            Inference steps of the DDIM grid the points are sampled on; the index is uniform in
            ``[0, ddim_steps)``.
        start_guidance (`float`, *optional*, defaults to `3.0`):
            Classifier-free guidance scale when sampling the points.
        negative_guidance (`float`, *optional*, defaults to `1.0`):
            η of the ESD target ``ε(z, "") − η (ε(z, c_e) − ε(z, ""))``.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the points. Each prompt draws its own points from ``seed`` and its place in
            its list, so they do not depend on the other prompts.

    Returns:
        `dict[str, float]`: the finite ones of

        - ``erasure_gap``: mean over the erased concepts of
          ``|| ε'(z, c_e) − target ||² / || ε(z, c_e) − target ||²`` with the ESD target of the
          original model: 1 before the edit, 0 when the edit reaches the target;
        - ``erasure_distance_before``: the mean ``|| ε(z, c_e) − target ||²`` of the erased
          concepts (the distance the erasure had to move);
        - ``preserved_drift`` / ``heldout_drift``: mean ``|| ε'(z, c) − ε(z, c) ||²`` over the
          ``preserved`` / ``heldout`` prompts, divided by ``erasure_distance_before``.
    """
    check_erasure_pipeline(pipe)
    device = next(original_unet.parameters()).device
    edited = pipe.unet
    sampler = LatentSampler(pipe.scheduler.config, ddim_steps)
    prediction_type = prediction_type_of(pipe)
    uncond = encode_prompts(pipe, [""], device)[0]
    shape = (num_samples, edited.config.in_channels, *(edited.config.sample_size,) * 2)
    if isinstance(edited.config.sample_size, (list, tuple)):
        shape = (num_samples, edited.config.in_channels, *edited.config.sample_size)

    def points(prompt_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # host: evaluation draws, the same on every device
        generator = torch.Generator().manual_seed(seed * 100_003 + prompt_index)
        noise = torch.randn(shape, generator=generator).to(device)  # host: see above
        # host: evaluation draws, once per prompt
        steps = torch.randint(ddim_steps, (num_samples,), generator=generator).tolist()
        return [(noise[n : n + 1], steps[n]) for n in range(num_samples)]

    def predictions(embedding, index):
        pairs = []
        for noise, i in points(index):
            z = sampler.sample(original_unet, embedding[None], uncond, noise, i, start_guidance)
            t = sampler.timestep(i).to(device)
            pairs.append((z, t, sampler.alpha_bar(i)))
        z = torch.cat([p[0] for p in pairs])
        t = torch.stack([p[1] for p in pairs])
        alpha_bar = torch.stack([p[2] for p in pairs])
        cond = embedding[None].expand(len(pairs), *embedding.shape)
        return z, t, alpha_bar, cond

    def distance(a, b, z, alpha_bar) -> torch.Tensor:  # mean squared ε difference
        return prediction_loss(a, b, z, alpha_bar, "epsilon", prediction_type)

    gaps, scales = [], []
    embeddings = encode_prompts(pipe, list(concepts), device)
    for n, embedding in enumerate(embeddings):
        z, t, alpha_bar, cond = predictions(embedding, n)
        eps_orig = _eps(original_unet, z, t, cond)
        eps_uncond = _eps(original_unet, z, t, uncond[None].expand_as(cond))
        target = erasure_target(eps_uncond, eps_orig, negative_guidance)
        before = distance(eps_orig, target, z, alpha_bar)
        after = distance(_eps(edited, z, t, cond), target, z, alpha_bar)
        gaps.append(float(after / before))
        scales.append(float(before))
    scale = sum(scales) / len(scales)
    out = {"erasure_gap": sum(gaps) / len(gaps), "erasure_distance_before": scale}

    def drift(prompts: Sequence[str], offset: int) -> float:
        values = []
        for n, embedding in enumerate(encode_prompts(pipe, list(prompts), device)):
            z, t, alpha_bar, cond = predictions(embedding, offset + n)
            edited_out, original_out = _eps(edited, z, t, cond), _eps(original_unet, z, t, cond)
            values.append(float(distance(edited_out, original_out, z, alpha_bar)))
        return sum(values) / len(values) / scale

    if preserved:
        out["preserved_drift"] = drift(preserved, 10_000)
    if heldout:
        out["heldout_drift"] = drift(heldout, 20_000)
    return {key: value for key, value in out.items() if math.isfinite(value)}
