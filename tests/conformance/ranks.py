"""One data-parallel run of a conformance case, reporting from every rank.

python tests/conformance/ranks.py CASE_ID VARIANT OUTPUT_DIR   (started by ``launch``)

Reports ``values`` (with ``num_processes`` and ``process_index``) and the ``initial/`` and
``final/`` tensors of ``Case.ranks.run``.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `conformance`

if __name__ == "__main__":
    torch.set_num_threads(1)
    from accelerate import PartialState

    from conformance import BY_ID
    from hf_extensions.cli import end_process_group
    from hf_extensions.testing.distributed import report

    case_id, variant, output_dir = sys.argv[1:4]
    torch.manual_seed(0)  # every rank builds the model from the same global random state
    values, initial, final = BY_ID[case_id].ranks.run(output_dir, variant)
    state = PartialState()
    values = {**values, "num_processes": state.num_processes, "process_index": state.process_index}
    tensors = {f"initial/{n}": t for n, t in initial.items()}
    tensors.update({f"final/{n}": t for n, t in final.items()})
    report(values, tensors)
    end_process_group()  # the run's trainer is out of scope: collect its DDP wrapper, then end
