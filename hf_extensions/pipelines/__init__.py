"""diffusers pipeline modifiers: concept erasure with adversarial preservation (EAP) and ESD.

``pipe = erase_concepts(pipe, ["nudity"], method="eap", config=ErasureConfig(...))`` returns the
same pipeline with an edited UNet (Bui et al., NeurIPS 2024, arXiv 2410.15618); ``save_erased``
/ ``load_erased`` / ``push_erased_to_hub`` save the whole pipeline or only the changed tensors
with a model card.
"""

from hf_extensions.pipelines.adversary import (
    CandidateSet,
    GumbelAdversary,
    gumbel_noise,
    gumbel_softmax,
    select_candidates,
)
from hf_extensions.pipelines.artifacts import (
    build_erasure_card,
    load_erased,
    push_erased_to_hub,
    save_erased,
)
from hf_extensions.pipelines.config import (
    ADVERSARY_ESTIMATORS,
    ADVERSARY_REFERENCES,
    LOSS_SPACES,
    METHODS,
    PARAMETER_GROUPS,
    ErasureConfig,
)
from hf_extensions.pipelines.erasure import (
    ConceptEraser,
    ErasureResult,
    LatentSampler,
    encode_prompts,
    erase_concepts,
    erasure_target,
    evaluate_erasure,
    prediction_loss,
)
from hf_extensions.pipelines.parameter_groups import in_group, select_parameters, set_trainable
from hf_extensions.pipelines.vocabulary import common_words

__all__ = [
    "ADVERSARY_ESTIMATORS",
    "ADVERSARY_REFERENCES",
    "LOSS_SPACES",
    "METHODS",
    "PARAMETER_GROUPS",
    "CandidateSet",
    "ConceptEraser",
    "ErasureConfig",
    "ErasureResult",
    "GumbelAdversary",
    "LatentSampler",
    "build_erasure_card",
    "common_words",
    "encode_prompts",
    "erase_concepts",
    "erasure_target",
    "evaluate_erasure",
    "gumbel_noise",
    "gumbel_softmax",
    "in_group",
    "load_erased",
    "prediction_loss",
    "push_erased_to_hub",
    "save_erased",
    "select_candidates",
    "select_parameters",
    "set_trainable",
]
