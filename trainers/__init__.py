"""``Trainer`` subclasses, one ``<method>_config.py`` + ``<method>_trainer.py`` pair per method.

Each trainer takes its config (a ``TrainingArguments`` subclass) as ``args`` and keeps the
stock ``Trainer``'s optimizer, scheduler, clipping, logging, checkpointing and ``push_to_hub``.
"""

from trainers.agnostic_sam_config import AgnosticSAMConfig
from trainers.agnostic_sam_trainer import AgnosticSAMTrainer
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer
from trainers.fhbi_config import FHBIConfig
from trainers.fhbi_trainer import FHBITrainer
from trainers.hierarchical_cl_config import HierarchicalPromptCLConfig
from trainers.hierarchical_cl_trainer import HierarchicalPromptCLTrainer
from trainers.method_config import MethodConfig
from trainers.method_trainer import MethodTrainer
from trainers.perturbation_config import PerturbationConfig
from trainers.perturbation_trainer import PerturbationTrainer
from trainers.pga_config import PGAConfig
from trainers.pga_trainer import PairedDomainCollator, PairedDomainDataset, PGATrainer, pga_update
from trainers.prompt_dsi_config import PromptDSIConfig
from trainers.prompt_dsi_trainer import PromptDSITrainer
from trainers.sam_config import SAMConfig
from trainers.sam_trainer import SAMTrainer

__all__ = [
    "AgnosticSAMConfig",
    "AgnosticSAMTrainer",
    "BayesianMutualLearningConfig",
    "BayesianMutualLearningTrainer",
    "FHBIConfig",
    "FHBITrainer",
    "HierarchicalPromptCLConfig",
    "HierarchicalPromptCLTrainer",
    "MethodConfig",
    "MethodTrainer",
    "PGAConfig",
    "PGATrainer",
    "PairedDomainCollator",
    "PairedDomainDataset",
    "PerturbationConfig",
    "PerturbationTrainer",
    "PromptDSIConfig",
    "PromptDSITrainer",
    "SAMConfig",
    "SAMTrainer",
    "pga_update",
]
