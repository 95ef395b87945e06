"""Shared set-up for the benchmarks: a real-architecture OpenCLIP model with random weights
(the same compute as the pretrained one) wrapped as a percept metric, without any download."""

from __future__ import annotations

import logging

import torch


def random_metric(arch: str, device: torch.device, *, dtype: torch.dtype = torch.float32, image_size: int = 224,
                  batch_size: int = 32, num_workers: int | None = None):
    """(bare OpenCLIP model, its preprocess cfg, PerceptualMetric sharing the same visual tower)."""
    import open_clip

    from percept_cli.models.encoder import PixelEncoder
    from percept_cli.models.loading import ModelSource
    from percept_cli.metric import PerceptualMetric

    logging.disable(logging.WARNING)  # "no pretrained weights loaded" is the point here
    model = open_clip.create_model(arch, pretrained=None, load_weights=False).eval().to(device, dtype)
    logging.disable(logging.NOTSET)
    pp = open_clip.get_model_preprocess_cfg(model)
    encoder = PixelEncoder(model.visual, pp["mean"], pp["std"], image_size).eval().requires_grad_(False)
    metric = PerceptualMetric(encoder, ModelSource(arch, "benchmark", arch, "open_clip"), batch_size=batch_size,
                              num_workers=num_workers)
    return model, pp, metric
