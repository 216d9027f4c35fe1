"""``MetaAugQuantizer``: the Optimum-style entry point of BRECQ / QDrop / MetaAug PTQ.

Usage (as optimum-intel's quantizers)::

    quantizer = MetaAugQuantizer.from_pretrained(model)          # or a local path / Hub id
    qmodel = quantizer.quantize(
        save_dir, calibration_dataset=dataset,                    # a datasets.Dataset
        quantization_config=MetaAugConfig(method="metaaug", weight_bits=4, activation_bits=4),
    )
    AutoModelForImageClassification.from_pretrained(save_dir)    # after ``import hf_extensions``

The calibration runs :func:`~hf_extensions.quantization.calibration.reconstruct_model` (block
reconstruction in forward order; MetaAug's bi-level stage before each inner block; Pham et al.,
ECCV 2024, arXiv 2407.14726) on the device of an ``accelerate.Accelerator`` with a progress bar
per block on the main process. A ``transformers`` model is saved with ``save_pretrained`` (its
``config.json`` carries the :class:`MetaAugConfig`, so transformers' own loader rebuilds it); any
other ``nn.Module`` (a torchvision CNN) is saved as ``model.safetensors`` +
``quantization_config.json`` and reloaded with :func:`load_quantized`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from optimum.quantization_base import OptimumQuantizer
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel

from hf_extensions.atomic import atomic_save, recover_interrupted_save
from hf_extensions.distributed import require_process_group
from hf_extensions.loading import check_tensors, read_json, read_tensors
from hf_extensions.quantization.calibration import ReconstructionResult, reconstruct_model
from hf_extensions.quantization.config import QUANT_METHOD, MetaAugConfig
from hf_extensions.quantization.modules import replace_with_quant_modules
from hf_extensions.validation import check_finite_tensor, check_integer, refuse

__all__ = ["MetaAugQuantizer", "calibration_images", "load_quantized"]

CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"


def calibration_images(
    dataset: Dataset | torch.Tensor, column: str = "pixel_values", num_samples: int | None = None
) -> torch.Tensor:
    """The calibration images ``[N, C, H, W]`` (float) of a ``datasets.Dataset`` or a tensor."""
    if isinstance(dataset, torch.Tensor):
        images = dataset
    elif isinstance(dataset, Dataset):
        if column not in dataset.column_names:
            raise ValueError(
                f"image_column={column!r} is invalid; allowed: one of {dataset.column_names}"
            )
        images = dataset.with_format("torch", columns=[column])[:][column]
    else:
        refuse("calibration_dataset", "a datasets.Dataset or a tensor of images", type(dataset))
    if num_samples is not None:
        images = images[: check_integer("num_samples", num_samples, low=1)]
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(
            f"`calibration_dataset` images of shape {tuple(images.shape)} are invalid; allowed: "
            "a non-empty [N, C, H, W] batch"
        )
    # a NaN image makes every activation range NaN: the scales, and so the whole model
    return check_finite_tensor("calibration_dataset", images.float())


class MetaAugQuantizer(OptimumQuantizer):
    """Block-reconstruction PTQ (``method = "brecq" | "qdrop" | "metaaug"``) of an image model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.result: ReconstructionResult | None = None

    @classmethod
    def from_pretrained(
        cls, model_or_path: nn.Module | str | Path, file_name: str | None = None, **kwargs: Any
    ) -> MetaAugQuantizer:
        """Wrap a model, or load one with ``AutoModelForImageClassification.from_pretrained``.

        Args:
            model_or_path (`nn.Module`, `str` or `pathlib.Path`):
                A float image model (a ``transformers`` model or any ``nn.Module``, such as a
                torchvision CNN), wrapped as it is and later quantized in place; or a local
                path / Hub id of an image-classification checkpoint to load.
            file_name (`str`, *optional*, defaults to `None`):
                Kept for ``OptimumQuantizer``'s signature; must be `None` when loading
                (transformers picks the file). Not used when a module is given.
            kwargs (additional keyword arguments, *optional*):
                Passed to ``AutoModelForImageClassification.from_pretrained`` when loading (e.g.
                ``revision=``); not used when a module is given.

        Returns:
            `MetaAugQuantizer`: the quantizer of the model.

        Raises:
            ValueError: ``file_name`` is given with a path.
        """
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path)
        if file_name is not None:
            refuse("file_name", "None (transformers picks the file)", file_name)
        return cls(AutoModelForImageClassification.from_pretrained(model_or_path, **kwargs))

    def quantize(
        self,
        save_dir: str | Path | None = None,
        file_prefix: str | None = None,
        calibration_dataset: Dataset | torch.Tensor | None = None,
        quantization_config: MetaAugConfig | dict | None = None,
        image_column: str = "pixel_values",
        num_samples: int | None = None,
        accelerator: Any = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> nn.Module:
        """Calibrate on ``calibration_dataset``, quantize ``self.model`` in place, save, return it.

        Runs :func:`~hf_extensions.quantization.calibration.reconstruct_model` on the
        accelerator's device; its per-block log is kept as ``self.result``.

        Args:
            save_dir (`str` or `pathlib.Path`, *optional*, defaults to `None`):
                Where to save the quantized model (main process only): ``save_pretrained`` for
                a ``transformers`` model, else ``model.safetensors`` + ``quantization_config.json``
                (reload with :func:`load_quantized`). `None`: not saved.
            file_prefix (`str`, *optional*, defaults to `None`):
                Kept for ``OptimumQuantizer``'s signature; must be `None` (the file names are
                transformers' own).
            calibration_dataset (`datasets.Dataset` or `torch.Tensor`):
                The calibration images: a dataset with an ``image_column`` of ``[C, H, W]``
                images, or a tensor ``[N, C, H, W]``. Required despite the `None` default.
            quantization_config (`MetaAugConfig` or `dict`, *optional*, defaults to `None`):
                The method, bit widths and calibration settings; a dict is read with
                ``MetaAugConfig.from_dict``; `None` uses ``MetaAugConfig()``.
            image_column (`str`, *optional*, defaults to `"pixel_values"`):
                The column of ``calibration_dataset`` that holds the images (not used for a
                tensor).
            num_samples (`int`, *optional*, defaults to `None`):
                Calibrate on the first ``num_samples`` images only; `None`: all of them.
            accelerator (`accelerate.Accelerator`, *optional*, defaults to `None`):
                The device and processes to run on (with several processes each takes its
                slice of every reconstruction batch and the gradients are averaged); `None`
                creates ``Accelerator()``. The model and images are moved to its device.
            progress (`bool`, *optional*, defaults to `True`):
                Show a progress bar over the blocks (local main process only).
            kwargs (additional keyword arguments, *optional*):
                Refused: any keyword argument not listed here raises ``ValueError``.

        Returns:
            `nn.Module`: ``self.model``, quantized in place.

        Raises:
            ValueError: unknown keyword arguments, a ``file_prefix``, no
                ``calibration_dataset``, a ``quantization_config`` of another type or with
                invalid values, a missing ``image_column``, or images that are not a non-empty
                ``[N, C, H, W]`` batch.
        """
        if kwargs:
            raise ValueError(f"unknown arguments {sorted(kwargs)}; see MetaAugQuantizer.quantize")
        if file_prefix is not None:
            refuse("file_prefix", "None", file_prefix)
        if calibration_dataset is None:
            refuse("calibration_dataset", "a datasets.Dataset of images", None)
        config = quantization_config if quantization_config is not None else MetaAugConfig()
        if isinstance(config, dict):
            config = MetaAugConfig.from_dict(config)
        if not isinstance(config, MetaAugConfig):
            refuse("quantization_config", "a MetaAugConfig (or its dict)", type(config))
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator()
        require_process_group(accelerator.num_processes, type(self).__name__)
        images = calibration_images(calibration_dataset, image_column, num_samples)
        self.model.to(accelerator.device)
        images = images.to(accelerator.device)
        self.result = reconstruct_model(
            self.model, images, config, accelerator=accelerator, progress=progress
        )
        self.config = config
        if save_dir is not None and accelerator.is_main_process:
            self.save(save_dir)
        return self.model

    def save(self, save_dir: str | Path) -> Path:
        """``save_pretrained`` for a transformers model; safetensors + JSON config otherwise.

        All-or-nothing (:func:`hf_extensions.atomic.atomic_save`): a process killed mid-save
        leaves the previous model in ``save_dir`` or this one, never parts of both."""
        save_dir = Path(save_dir)
        with atomic_save(save_dir) as stage:
            if isinstance(self.model, PreTrainedModel):
                self.model.save_pretrained(stage)
            else:
                state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
                save_file(state, str(stage / WEIGHTS_NAME), metadata={"quant_method": QUANT_METHOD})
                (stage / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        return save_dir


def load_quantized(model: nn.Module, save_dir: str | Path) -> nn.Module:
    """Load a quantized non-transformers model saved by :meth:`MetaAugQuantizer.save`.

    (A ``transformers`` model saved by the quantizer loads with its own ``from_pretrained``
    after ``import hf_extensions``.)

    Args:
        model (`nn.Module`):
            The float architecture of the saved model (e.g. a fresh torchvision CNN); its
            layers are converted in place with the stored config, which is validated as a
            user-given one, and the saved state is loaded strictly.
        save_dir (`str` or `pathlib.Path`):
            The directory holding ``quantization_config.json`` and ``model.safetensors``.

    Returns:
        `nn.Module`: ``model``, quantized and loaded, in eval mode.

    Raises:
        ValueError: the stored config is of another ``quant_method`` or has invalid values, or
            the saved state does not match the converted ``model`` (a missing or unexpected
            tensor, or one of another shape: another architecture), naming the file.

    An interrupted :meth:`MetaAugQuantizer.save` is first finished or discarded.
    """
    save_dir = Path(save_dir)
    recover_interrupted_save(save_dir)
    config_path, path = save_dir / CONFIG_NAME, save_dir / WEIGHTS_NAME
    data = read_json(config_path)
    if data.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{config_path}: quant_method={data.get('quant_method')!r} is invalid; allowed: "
            f"{QUANT_METHOD!r}"
        )
    config = MetaAugConfig.from_dict(data)
    state = read_tensors(path)
    replace_with_quant_modules(model, config)
    check_tensors(path, state, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.eval()
