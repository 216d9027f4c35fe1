"""Reload saved artifacts in a fresh process and write what they compute.

python tests/conformance/reload.py MANIFEST.json

The manifest lists ``{"case", "directory", "output"}``; for each entry the case's ``reload`` hook
rebuilds the artifact from ``directory`` and its outputs are written to ``output``
(safetensors), or the error to ``output + ".error"``, so that one failing case fails only its
own test.
"""

import json
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `conformance`

if __name__ == "__main__":
    torch.set_num_threads(1)
    from conformance import BY_ID

    for entry in json.loads(Path(sys.argv[1]).read_text()):
        try:
            outputs = BY_ID[entry["case"]].reload(Path(entry["directory"]))
            tensors = {name: t.detach().cpu().contiguous() for name, t in outputs.items()}
            save_file(tensors, entry["output"])
        except Exception:
            Path(entry["output"] + ".error").write_text(traceback.format_exc())
