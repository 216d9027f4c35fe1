"""Run the hierarchical continual-learning recipe and report every rank's learned state.

python tests/scripts/hierarchical_cl_ranks.py --config ... [recipe flags]
"""

import sys

from hf_extensions.cli import end_process_group
from hf_extensions.testing.distributed import report
from recipes.hierarchical_cl.train import main

if __name__ == "__main__":
    trainer, metrics = main(sys.argv[1:])
    model = trainer.accelerator.unwrap_model(trainer.model)
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors["tii.weight"] = trainer.tii_head.weight
    for c, mixture in trainer.prompted_mixtures.items():
        tensors[f"prompted.{c}.means"] = mixture.means
    report(
        {
            "num_processes": trainer.accelerator.num_processes,
            "faa": metrics["test_final_average_accuracy"],
            "global_step": trainer.state.global_step,
        },
        tensors,
    )
    end_process_group(trainer)  # before exit: see hf_extensions.cli.end_process_group
