"""Block reconstruction under ``accelerate launch``: each rank reports its quantized state dict."""

import sys

import torch
from accelerate import Accelerator

from hf_extensions.cli import end_process_group
from hf_extensions.quantization import MetaAugConfig, MetaAugQuantizer
from hf_extensions.quantization.models import DigitsResNet
from hf_extensions.testing import report

torch.set_num_threads(1)
torch.manual_seed(0)
model = DigitsResNet(width=4).eval()
images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
accelerator = Accelerator()
config = MetaAugConfig(
    method=sys.argv[1], weight_bits=2, activation_bits=4, iterations=8, batch_size=16,
    meta_iterations=2,
)  # fmt: skip
quantizer = MetaAugQuantizer.from_pretrained(model)
qmodel = quantizer.quantize(
    None, calibration_dataset=images, quantization_config=config, accelerator=accelerator,
    progress=False,
)  # fmt: skip
report(
    values={
        "num_processes": accelerator.num_processes,
        "local_batch_size": quantizer.result.losses["layer1"]["local_batch_size"],
    },
    tensors={k: v for k, v in qmodel.state_dict().items() if v.is_floating_point()},
)
end_process_group(accelerator)  # before exit: see hf_extensions.cli.end_process_group
