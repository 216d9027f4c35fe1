"""Run a recipe as a user would, against the fake Hub, in a working folder of its own per rank.

python tests/scripts/recipe_artifacts.py <workdir> recipes.example.train --config /abs/x.yaml ...

Each process changes into ``<workdir>/rank<RANK>`` and runs the recipe module as ``__main__``
(so its summary is printed as on the command line) inside ``fake_hub("hub")``. The recipe's
arguments give *relative* output paths, so whatever a rank writes lands in its own folder, by
whatever means it was written (Python, safetensors' Rust, torch's C++): rank 1's folder must
stay empty. Every rank reports, through :func:`hf_extensions.testing.report`, the commits its
fake Hub received and what the recipe printed.
"""

import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

from hf_extensions.testing import fake_hub, report


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


if __name__ == "__main__":
    workdir, recipe, *argv = sys.argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    folder = Path(workdir) / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    out = _Tee(sys.stdout)
    with fake_hub("hub") as hub, contextlib.redirect_stdout(out):
        sys.argv = [recipe, *argv]
        runpy.run_module(recipe, run_name="__main__", alter_sys=True)
    report(
        {
            "rank": rank,
            "commits": [
                {"repo_id": c.repo_id, "message": c.message, "added": list(c.added)}
                for c in hub.commits
            ],
            "stdout": out.copy.getvalue(),
        }
    )
