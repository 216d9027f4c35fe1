"""The cases of the conformance suite (``tests/test_conformance.py``): one per method, one module
per method family; the shared hook helpers live in ``case.py``."""

from conformance.bnn import BNN
from conformance.case import PROPERTIES, Case
from conformance.erasure import ERASURE
from conformance.fhbi import FHBI
from conformance.hierarchical_cl import HIERARCHICAL_CL
from conformance.metaaug import METAAUG
from conformance.pga import PGA
from conformance.prompt_dsi import PROMPT_DSI
from conformance.prompt_pool import PROMPT_POOL
from conformance.s2n import S2N
from conformance.sam import AGNOSTIC_SAM, ASAM, SAM
from conformance.shared_prefix import SHARED_PREFIX

#: The ``Trainer`` methods, then the others (PEFT methods, pipeline modifier, scheduler,
#: quantizer).
CASES: tuple[Case, ...] = (
    AGNOSTIC_SAM,
    SAM,
    ASAM,
    FHBI,
    BNN,
    HIERARCHICAL_CL,
    PROMPT_DSI,
    PGA,
    SHARED_PREFIX,
    PROMPT_POOL,
    ERASURE,
    S2N,
    METAAUG,
)
BY_ID = {case.id: case for case in CASES}

__all__ = ["BY_ID", "CASES", "PROPERTIES", "Case"]
