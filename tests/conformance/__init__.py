"""The cases of the conformance suite (``tests/test_conformance.py``): one per method."""

from conformance.case import PROPERTIES, Case
from conformance.other_cases import OTHER_CASES
from conformance.trainer_cases import TRAINER_CASES

CASES: tuple[Case, ...] = (*TRAINER_CASES, *OTHER_CASES)
BY_ID = {case.id: case for case in CASES}

__all__ = ["BY_ID", "CASES", "PROPERTIES", "Case"]
