"""Post-training quantization recipe: BRECQ / QDrop / MetaAug through ``MetaAugQuantizer``.

MetaAug: Pham et al., "MetaAug: Meta-Data Augmentation for Post-Training Quantization", ECCV 2024
(arXiv 2407.14726). One script, one YAML per setting:

- ``digits.yaml`` -- the embedded default: the script trains a small ResNet-style CNN on
  scikit-learn's digits itself (offline), then quantizes it at W4A4 and W2A4 from 128
  calibration images, and reports calibration and held-out accuracy;
- ``resnet18_imagenet.yaml``, ``resnet50_imagenet.yaml``, ``mobilenetv2_imagenet.yaml`` -- the
  paper's models from the Hub (``microsoft/resnet-18``, ``microsoft/resnet-50``,
  ``google/mobilenet_v2_1.0_224``) calibrated on ImageNet (``ILSVRC/imagenet-1k``, gated: accept
  its terms and log in first), for a GPU.

Launch (Accelerate places the model and data on the device; progress is shown per block)::

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/quantization/train.py --config recipes/quantization/digits.yaml

Every setting (``--settings w4a4 w2a4``) is saved under ``output_dir/<setting>``: a transformers
model with ``save_pretrained`` (reload: ``AutoModelForImageClassification.from_pretrained`` after
``import hf_extensions``), the embedded CNN as safetensors + ``quantization_config.json``
(``load_quantized``), each with an integer export (``model_int.safetensors``) and a model card
with the code that reloads and runs it; ``output_dir`` gets a card of every setting, and
``--push_to_hub --hub_model_id user/name`` uploads the folder in one commit. The main process
writes and pushes; the run ends with the accuracies and the line that loads each setting.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hf_extensions.cli import (
    Artifact,
    RecipeArgumentParser,
    process_state,
    push_folder,
    run_as_script,
)
from hf_extensions.data.hard_digits import STYLES, render_hard_digits
from hf_extensions.demo import Comparison, run_comparison
from hf_extensions.hub import Usage, build_model_card, save_model_card
from hf_extensions.models.image_classification import HARD_DIGITS
from hf_extensions.quantization import MetaAugConfig, MetaAugQuantizer, export_integer
from hf_extensions.quantization.models import digits_tensors, evaluate_accuracy, train_digits_cnn
from hf_extensions.validation import check_integer, refuse

RECIPE_DIR = Path(__file__).resolve().parent
_SETTING = re.compile(r"^w([2-8])a([2-8]|16)$")


@dataclass
class QuantizationRecipeArguments:
    """What to quantize, on which images, at which bit widths."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or path of an image classifier (e.g. microsoft/resnet-18). Empty: "
            "the embedded CNN, trained on digits by this script (offline)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset of the calibration/evaluation images; 'hard_digits': the "
            "embedded hard digits' digit x ink classes (with the zoo's resnet20). Empty: digits."
        },
    )
    hard_digits_styles: list[str] = field(
        default_factory=lambda: list(STYLES),
        metadata={"help": "Hard digits: the styles drawn from (the model's training styles)."},
    )
    hard_digits_colours: list[str] = field(
        default_factory=lambda: ["red", "green", "blue", "yellow"],
        metadata={"help": "Hard digits: the inks, in the model's label order."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset config."})
    image_column: str = field(default="image", metadata={"help": "Column of the images."})
    label_column: str = field(default="label", metadata={"help": "Column of the labels."})
    calibration_split: str = field(default="train", metadata={"help": "Calibration split."})
    eval_split: str = field(default="validation", metadata={"help": "Held-out split."})
    num_calibration: int = field(default=128, metadata={"help": "Calibration images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Held-out cap."})
    settings: list[str] = field(
        default_factory=lambda: ["w4a4", "w2a4"],
        metadata={"help": "Bit settings 'w<bits>a<bits>' (a16: weight-only)."},
    )
    train_epochs: int = field(default=20, metadata={"help": "Embedded CNN: training epochs."})
    output_dir: str = field(default="outputs/quantization", metadata={"help": "Where to save."})
    integer_export: bool = field(default=True, metadata={"help": "Also write the int export."})
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Upload output_dir (every setting, one commit) to hub_model_id."},
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository to push to."})

    def __post_init__(self) -> None:
        for setting in self.settings:
            if not _SETTING.match(setting):
                refuse(
                    "settings",
                    "a list of entries like 'w4a4', 'w2a4', 'w8a16' (weight bits 2-8, "
                    "activation bits 2-8 or 16 = float)",
                    self.settings,
                )
        check_integer("num_calibration", self.num_calibration, low=1)
        if self.push_to_hub and not self.hub_model_id:
            refuse(
                "hub_model_id", "a Hub repository id when `push_to_hub` is set", self.hub_model_id
            )
        if self.dataset_name is not None and self.model_name_or_path is None:
            refuse(
                "model_name_or_path",
                "set when `dataset_name` is (its image processor prepares the images)",
                self.model_name_or_path,
            )


def quantized_usage(artifact: str, setting: str, transformers_model: bool) -> Usage:
    """Load the quantized model of ``setting`` (a subfolder of ``artifact``) and classify."""
    if transformers_model:
        return Usage(
            imports=(
                "import torch",
                "from transformers import AutoModelForImageClassification",
                "import hf_extensions  # noqa: F401  (registers the quantization method)",
            ),
            load=(
                "model = AutoModelForImageClassification.from_pretrained("
                f'"{artifact}", subfolder="{setting}").eval()',
            ),
            run=(
                "config = model.config",
                'size = getattr(config, "image_size", 224)',
                "with torch.no_grad():",
                "    print(model(torch.rand(2, config.num_channels, size, size)).logits.softmax(-1))",
            ),
        )
    return Usage(
        imports=(
            "import os",
            "import torch",
            "from hf_extensions.hub import local_folder",
            "from hf_extensions.quantization import load_quantized",
            "from hf_extensions.quantization.models import DigitsResNet",
        ),
        load=(
            f'folder = os.path.join(local_folder("{artifact}"), "{setting}")',
            "model = load_quantized(DigitsResNet(), folder).eval()  # the embedded digits CNN",
        ),
        run=(
            "with torch.no_grad():",
            "    print(model(torch.rand(2, 1, 8, 8)).softmax(-1))  # 8x8 gray digits",
        ),
    )


def _bits(setting: str) -> tuple[int, int | None]:
    weight, act = _SETTING.match(setting).groups()
    return int(weight), None if act == "16" else int(act)


def _hub_images(args: QuantizationRecipeArguments, split: str, count: int | None, seed: int):
    from datasets import load_dataset
    from transformers import AutoImageProcessor

    data = load_dataset(args.dataset_name, args.dataset_config_name, split=split)
    data = data.shuffle(seed=seed)
    if count is not None:
        data = data.select(range(min(count, len(data))))
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    images, labels = [], []
    for start in range(0, len(data), 64):
        batch = data[start : start + 64]
        rgb = [image.convert("RGB") for image in batch[args.image_column]]
        images.append(processor(rgb, return_tensors="pt")["pixel_values"])
        labels.append(torch.tensor(batch[args.label_column]))
    return torch.cat(images), torch.cat(labels)


def _hard_digit_images(args: QuantizationRecipeArguments, split: str, count: int, seed: int):
    batch = render_hard_digits(
        count,
        split=split,
        styles=args.hard_digits_styles,
        colours=args.hard_digits_colours,
        seed=seed,
    )
    return batch.images, batch.fine


def load_setting(args: QuantizationRecipeArguments, seed: int):
    """The float model, calibration images/labels and held-out images/labels."""
    if args.model_name_or_path is None:
        data = digits_tensors(seed)
        model = train_digits_cnn(*data["train"], seed=seed, epochs=args.train_epochs)
        pick = torch.randperm(len(data["train"][1]), generator=torch.Generator().manual_seed(seed))
        pick = pick[: args.num_calibration]
        calib = (data["train"][0][pick], data["train"][1][pick])
        held = data["test"]
        if args.max_eval_samples is not None:
            held = (held[0][: args.max_eval_samples], held[1][: args.max_eval_samples])
        return model, calib, held
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path).eval()
    if args.dataset_name == HARD_DIGITS:  # calibrate on training images, test on unseen sources
        calib = _hard_digit_images(args, "train", args.num_calibration, seed)
        held = _hard_digit_images(args, "test", args.max_eval_samples or 1000, seed)
        return model, calib, held
    calib = _hub_images(args, args.calibration_split, args.num_calibration, seed)
    held = _hub_images(args, args.eval_split, args.max_eval_samples, seed)
    return model, calib, held


def main(argv: list[str] | None = None) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    """Quantize at every setting; return ``({setting: model}, metrics)``."""
    parser = RecipeArgumentParser((QuantizationRecipeArguments, MetaAugConfig))
    args, config = parser.parse(argv)
    torch.manual_seed(config.seed)
    fp_model, calib, held = load_setting(args, config.seed)
    metrics = {
        "fp_calib_acc": evaluate_accuracy(fp_model, *calib),
        "fp_heldout_acc": evaluate_accuracy(fp_model, *held),
    }
    models = {}
    artifact = args.hub_model_id if args.push_to_hub else args.output_dir
    usages = {}
    for setting in args.settings:
        weight_bits, activation_bits = _bits(setting)
        setting_config = dataclasses.replace(
            config, weight_bits=weight_bits, activation_bits=activation_bits
        )
        save_dir = Path(args.output_dir) / setting
        quantizer = MetaAugQuantizer.from_pretrained(copy.deepcopy(fp_model))
        model = quantizer.quantize(
            save_dir, calibration_dataset=calib[0], quantization_config=setting_config
        )
        models[setting] = model
        prefix = f"{setting}_{config.method}"
        metrics[f"{prefix}_calib_acc"] = evaluate_accuracy(model, *calib)
        metrics[f"{prefix}_heldout_acc"] = evaluate_accuracy(model, *held)
        metrics[f"{prefix}_seconds"] = quantizer.result.total_seconds
        usages[setting] = quantized_usage(artifact, setting, isinstance(model, PreTrainedModel))
        if not process_state().is_main_process:
            continue  # the quantizer saved from the main process; so do the export and card
        if args.integer_export:
            export_integer(model, save_dir, config=setting_config)
        card = _card(args, setting_config, metrics, prefix, usages[setting])
        save_model_card(card, save_dir)
    if process_state().is_main_process:  # the folder's own card: every setting, every metric
        others = [f"### {name}\n\n```python\n{usages[name].code}\n```" for name in usages]
        card = _card(args, config, metrics, "", next(iter(usages.values())), "\n\n".join(others))
        save_model_card(card, args.output_dir)
    process_state().wait_for_everyone()
    if args.push_to_hub:
        push_folder(args.output_dir, args.hub_model_id, f"PTQ ({config.method}): {args.settings}")
    return models, metrics


def _card(args, config, metrics: dict, prefix: str, usage: Usage, extra_text: str = ""):
    """The card of one setting (``prefix``: its metrics), or with ``prefix=""`` of them all."""
    return build_model_card(
        method=f"ptq-{config.method}",
        paper="MetaAug: Meta-Data Augmentation for Post-Training Quantization",
        arxiv_id="2407.14726",
        hyperparameters=config.to_dict() if prefix else {"settings": list(args.settings)},
        metrics={  # accuracies; how long calibration took is not a figure of the model
            k: v
            for k, v in metrics.items()
            if k.startswith(("fp_", prefix)) and not k.endswith("_seconds")
        },
        base_model=args.model_name_or_path,
        tags=["quantization", config.method],
        datasets=[args.dataset_name or "scikit-learn digits"],
        usage=usage,
        extra_text=("## Every setting\n\n" + extra_text) if extra_text else "",
    )


def accuracies(result) -> dict[str, float]:
    """The summary: every accuracy of ``main``'s metrics (full precision, each setting)."""
    return {k: v for k, v in result[1].items() if k.endswith("_acc")}


def demo() -> Comparison:
    """The zoo's ResNet-20 (40 digit x ink classes) quantized at W2A4 from 128
    calibration images: MetaAug beside QDrop (the reconstruction MetaAug builds on), same
    iterations; held-out accuracy."""

    def held_out(result) -> dict[str, float]:
        return {
            f"{setting.upper()} held-out accuracy (%)": value
            for key, value in result[1].items()
            for setting in [key.split("_")[0]]
            if key.endswith("_heldout_acc") and not key.startswith("fp_")
        }

    return run_comparison(
        method=main,
        baseline_name="QDrop (no meta-augmentation)",
        baseline_flags=["--method", "qdrop"],
        config=RECIPE_DIR / "zoo_resnet20.yaml",
        summary=held_out,
        fixture="resnet20",
    )


def artifacts(result, argv: list[str]) -> list[Artifact]:
    """Every setting's quantized model and the line that loads it (printed after a run of
    ``main(argv)``)."""
    models, _ = result
    args, _ = RecipeArgumentParser((QuantizationRecipeArguments, MetaAugConfig)).parse(argv)
    hub_id = args.hub_model_id if args.push_to_hub else None
    return [
        Artifact(
            str(Path(args.output_dir) / setting),
            quantized_usage(args.output_dir, setting, isinstance(model, PreTrainedModel)),
            hub_id,
        )
        for setting, model in models.items()
    ]


if __name__ == "__main__":
    run_as_script(  # every metric
        main, lambda result: result[1], artifacts=lambda result: artifacts(result, sys.argv[1:])
    )
