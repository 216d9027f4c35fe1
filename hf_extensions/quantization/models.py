"""A small torchvision-style residual CNN for scikit-learn's 8x8 digits, and its training loop.

The embedded model of the quantization recipe, benchmark and tests: the same layout as
torchvision's ResNet (a stem ``conv1``/``bn1``, ``layer1``/``layer2`` made of ``BasicBlock`` s,
global average pooling, ``fc``), sized for 1x8x8 images, so that block-wise reconstruction meets the
same module structure it meets on ResNet-18 (BRECQ reconstructs one ``BasicBlock`` at a time).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from hf_extensions.data import load_digits

__all__ = [
    "BasicBlock",
    "DigitsResNet",
    "digits_tensors",
    "evaluate_accuracy",
    "model_logits",
    "train_digits_cnn",
]


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv-bn-relu-conv-bn plus a (projected) shortcut, relu."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class DigitsResNet(nn.Module):
    """ResNet-style classifier of 1x8x8 images: stem, two ``BasicBlock`` stages, ``fc``."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def digits_tensors(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (images [N, 1, 8, 8] in [0, 1], labels [N])}`` of the embedded digits."""
    data = load_digits(seed=seed, layout="image")
    out = {}
    for split in ("train", "validation", "test"):
        columns = data[split].with_format("torch", columns=["pixel_values", "labels"])[:]
        out[split] = (columns["pixel_values"].float(), columns["labels"].long())
    return out


def train_digits_cnn(
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    epochs: int = 30,
    width: int = 16,
    lr: float = 3e-3,
    batch_size: int = 64,
) -> DigitsResNet:
    """Train a :class:`DigitsResNet` with Adam and cross-entropy; returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsResNet(width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            opt.step()
    return model.eval()


def model_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of a ``transformers`` model (``pixel_values=``) or a torchvision-style model."""
    if isinstance(model, PreTrainedModel):
        return model(pixel_values=images).logits
    out = model(images)
    return getattr(out, "logits", out)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        correct += (model_logits(model, x).argmax(-1) == y).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(labels)
