"""torchvision ResNet-18 on 64 x 64 images: a convolutional network, per-layer int8 / bf16 / fp32.

No download: the weights are torchvision's seeded random initialisation, made realistic for numerics by
recalibrating the BatchNorm statistics on seeded random images (in train mode, as a trained network's
BatchNorm layers were), so every block sees unit-scale activations. With random weights there is no task
accuracy to score, so the score is autoprec's default: output fidelity, the mean cosine similarity of
the 1000 logits to the fp32 model's, over 64 images. Latency and memory: one batch of 8 images.

On the CPU every layer may take fp32, bf16 or int8 (`autoprec layers studies/resnet/model.py --space cpu`):
the 20 Conv2d layers as static int8 (input ranges calibrated on `calibration_inputs()`), `fc` as dynamic
int8. On CUDA the convolutions take fp32 / fp16 / bf16.
"""

import torch
import torchvision

IMAGE = 64  # pixels per side: small enough for a 2-core CPU, large enough for all five stages
_STATE: dict[str, torch.Tensor] = {}


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _calibrated_state() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in range(4):
            model(_images(32, 100 + seed))
    return model.state_dict()


def build_model() -> torch.nn.Module:
    if not _STATE:
        _STATE.update(_calibrated_state())
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(_STATE)
    # channels_last: oneDNN's layout for float and int8 convolutions alike, so no layer reorders
    return model.to(memory_format=torch.channels_last).eval()


def example_inputs() -> torch.Tensor:
    return _images(8, 1)


def eval_inputs() -> list[torch.Tensor]:
    return [_images(16, 10 + i) for i in range(4)]


def calibration_inputs() -> list[torch.Tensor]:
    """The batches static int8 layers observe their input ranges on: not the scored ones."""
    return [_images(16, 200 + i) for i in range(4)]
