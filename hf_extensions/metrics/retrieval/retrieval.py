"""Hits@k and MRR@k as a local `evaluate` metric.

The formulas are `hits_at_k` / `mrr_at_k` in `hf_extensions.metrics.functional`.
"""

import datasets
import evaluate

from hf_extensions.metrics import functional

_DESCRIPTION = (
    "Hits@k (a relevant id among the first k) and MRR@k (reciprocal rank of the first relevant "
    "id, 0 beyond rank k), averaged over queries."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str` or `int`): per query, the ranked ids, best first.
    references (`str`/`int`, or `list` of them): per query, the relevant id(s). Ids are all
        strings or all integers.
    k (`int` or `list` of `int`, defaults to (1, 10)): cut-offs.
Returns:
    hits@k and mrr@k (`float`) for every k.
Examples:
    >>> metric = evaluate.load("hf_extensions/metrics/retrieval/retrieval.py")
    >>> metric.compute(predictions=[["a", "b"], ["c", "d"]], references=["b", "x"], k=[1, 2])
    {'hits@1': 0.0, 'mrr@1': 0.0, 'hits@2': 0.5, 'mrr@2': 0.25}
"""

_CITATION = ""


def _features(id_type: str, single_reference: bool) -> datasets.Features:
    reference = datasets.Value(id_type)
    return datasets.Features(
        {
            "predictions": datasets.List(datasets.Value(id_type)),
            "references": reference if single_reference else datasets.List(reference),
        }
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
    """Hits@k and MRR@k for a list of cut-offs."""

    def _info(self) -> evaluate.MetricInfo:
        # evaluate picks the first format that the first example fits; a string id where a list
        # is expected, or a non-string where a string is expected, is rejected, so the order
        # below selects strings vs integers and one vs several relevant ids unambiguously.
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                _features(id_type, single)
                for id_type in ("string", "int64")
                for single in (False, True)
            ],
        )

    def _compute(self, predictions, references, k=(1, 10)) -> dict[str, float]:
        cutoffs = list(k) if isinstance(k, (list, tuple)) else [k]
        results = {}
        for cutoff in cutoffs:
            results[f"hits@{cutoff}"] = functional.hits_at_k(predictions, references, cutoff)
            results[f"mrr@{cutoff}"] = functional.mrr_at_k(predictions, references, cutoff)
        return results
