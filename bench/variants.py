"""Switches for measuring MAML levers on the GPU against the defaults in one run
(bench/gpu_check_maml.py times them side by side)."""
import contextlib
import types

import torch

import pymeta.models as models

NAMES = ("cudnn_benchmark", "channels_last", "no_patches", "plain_conv")


@contextlib.contextmanager
def maml_variant(*names):
    """Within the block, Conv4.forward_tasks runs with the named changes:
    - "cudnn_benchmark": cuDNN autotunes each conv shape (torch.backends.cudnn.benchmark);
    - "channels_last": activations in NHWC from the first conv on (a stand-in for models.F
      whose conv2d converts its input; BatchNorm, ReLU and max-pool keep the format);
    - "no_patches": the one-channel first layer as a grouped conv on the GPU (not patches x
      weights);
    - "plain_conv": the grouped convs with F.conv2d's own derivatives (not models._GroupedConv)."""
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"maml_variant: unknown names {sorted(unknown)}; known: {NAMES}")
    plain_F, patches, grouped = models.F, models._PATCHES_DEVICES, models._GROUPED_CONV_DEVICES
    bench = torch.backends.cudnn.benchmark
    try:
        if "cudnn_benchmark" in names:
            torch.backends.cudnn.benchmark = True
        if "channels_last" in names:
            shim = types.SimpleNamespace(**{k: getattr(plain_F, k) for k in dir(plain_F)
                                            if not k.startswith("__")})
            shim.conv2d = lambda x, *a, **k: plain_F.conv2d(
                x.contiguous(memory_format=torch.channels_last), *a, **k)
            models.F = shim
        if "no_patches" in names:
            models._PATCHES_DEVICES = tuple(d for d in patches if d != "cuda")
        if "plain_conv" in names:
            models._GROUPED_CONV_DEVICES = ()
        yield
    finally:
        models.F, models._PATCHES_DEVICES, models._GROUPED_CONV_DEVICES = plain_F, patches, grouped
        torch.backends.cudnn.benchmark = bench
