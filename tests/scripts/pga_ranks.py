"""Train PGA prompts for a few steps and report, from every rank, the final prompts (DDP tests).

python tests/scripts/pga_ranks.py OUTPUT_DIR PER_DEVICE_BATCH RHO ALIGN
"""

import sys

import torch

from hf_extensions.cli import end_process_group
from hf_extensions.models import tiny_clip
from hf_extensions.pga.clip_prompts import CLIPPromptLearner
from hf_extensions.testing.distributed import report
from trainers.pga_config import PGAConfig
from trainers.pga_trainer import PairedDomainDataset, PGATrainer

if __name__ == "__main__":
    output_dir, batch, rho, align = (
        sys.argv[1],
        int(sys.argv[2]),
        float(sys.argv[3]),
        float(sys.argv[4]),
    )
    torch.set_num_threads(1)
    clip, tokenizer = tiny_clip()
    torch.manual_seed(0)
    learner = CLIPPromptLearner(
        clip,
        tokenizer,
        ["zero", "one", "two"],
        ["source", "target"],
        n_ctx_shared=2,
        n_ctx_domain=2,
    )
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 3
    domains = {
        name: {"pixel_values": torch.rand(64, 3, 16, 16, generator=generator), "labels": labels}
        for name in ("source", "target")
    }
    config = PGAConfig(
        output_dir=output_dir, n_ctx_shared=2, n_ctx_domain=2, pga_rho=rho, pga_align=align,
        per_device_train_batch_size=batch, max_steps=3, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = PGATrainer(model=learner, args=config, train_dataset=PairedDomainDataset(domains))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    report(
        {
            "num_processes": trainer.accelerator.num_processes,
            "global_step": trainer.state.global_step,
        },
        {name: p for name, p in model.named_parameters() if p.requires_grad},
    )
    end_process_group(trainer)  # before exit: see hf_extensions.cli.end_process_group
