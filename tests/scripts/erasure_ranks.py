"""EAP erasure under ``accelerate launch``: every rank reports its edited UNet and adversary.

python tests/scripts/erasure_ranks.py GRADIENT_ACCUMULATION_STEPS
"""

import sys

import torch

from hf_extensions.cli import end_process_group
from hf_extensions.models import tiny_stable_diffusion_pipeline
from hf_extensions.pipelines import ConceptEraser, ErasureConfig
from hf_extensions.testing import report

if __name__ == "__main__":
    torch.set_num_threads(1)
    config = ErasureConfig(
        num_steps=3, learning_rate=1e-2, ddim_steps=3, k_closest=6, num_centers=4,
        candidates=["dog", "cat", "tree", "house", "car", "boat", "music", "river"],
        gradient_accumulation_steps=int(sys.argv[1]), seed=0, progress_bar=False,
    )  # fmt: skip
    eraser = ConceptEraser(tiny_stable_diffusion_pipeline(), ["a red circle"], "eap", config)
    for _ in range(config.num_steps):
        eraser.step()
    pipe = eraser.finish()
    report(
        values={
            "num_processes": eraser.accelerator.num_processes,
            "cycles": sum(eraser.choices[0].values()),
        },
        tensors={
            "logits": eraser.adversaries[0].logits.detach(),
            **{
                name: value
                for name, value in pipe.unet.state_dict().items()
                if name in pipe.erasure_result.trained_parameters
            },
        },
    )
    end_process_group(eraser)  # before exit: see hf_extensions.cli.end_process_group
