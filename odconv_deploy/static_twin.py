"""Static twins of arbitrary networks: every ODConv layer replaced by a plain ``nn.Conv2d``.

The zoo has a named static twin for each of its models (``resnet18`` for ``od_resnet18``);
users' own networks do not. :func:`derive_static_twin` builds one for any network, so the
"cost over static" of ODConv (latency ratio of the ODConv model to the same network with
ordinary convolutions) can be measured for it too.

The twin is a *latency baseline*, not a trained model: its weights are synthetic (seeded,
deterministic, via :func:`odconv_deploy.synthetic.synthesize_weights`) and unrelated to the
original's, because weights do not change the latency of a dense conv network. Compare only
timings (and shapes) between a model and its twin, never outputs.
"""

from __future__ import annotations

import copy

from torch import nn

from odconv_deploy.detect import inspect_odconv
from odconv_deploy.layers import ODConv2dDeploy
from odconv_deploy.reparameterize import find_odconv_layers
from odconv_deploy.synthetic import synthesize_weights

__all__ = ["derive_static_twin", "static_conv_for"]


def static_conv_for(layer: nn.Module, name: str = "") -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with the geometry of one ODConv layer (train or deploy form).

    The conv has the layer's input and output channels, square kernel, stride, padding,
    dilation and groups, and is placed on the layer's device with its dtype. A train-form
    layer has no bias, so neither has its conv. A deploy-form layer that carries an output
    bias (a BatchNorm was folded into it and replaced by ``nn.Identity``) gets a conv with a
    bias, as the static network would have after the same BatchNorm fold.

    Args:
        layer: A train-form ODConv layer of any class (recognised by structure, see
            :mod:`odconv_deploy.detect`) or an :class:`~odconv_deploy.layers.ODConv2dDeploy`.
        name: The layer's qualified name, used in error messages.

    Returns:
        The static conv, with PyTorch's default (random) initialisation.

    Raises:
        UnsupportedLayerError: ``layer`` is neither a deploy form nor a readable ODConv layer.
    """
    if isinstance(layer, ODConv2dDeploy):
        in_channels, out_channels = layer.in_channels, layer.out_channels
        kernel_size, stride, padding = layer.kernel_size, layer.stride, layer.padding
        dilation, groups = layer.dilation, layer.groups
        bias = layer.bias is not None
        reference = layer.weight
    else:
        spec = inspect_odconv(layer, name)
        in_channels, out_channels = spec.in_channels, spec.out_channels
        kernel_size, stride, padding = spec.kernel_size, spec.stride, spec.padding
        dilation, groups = spec.dilation, spec.groups
        bias = False
        reference = spec.weight
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=bias,
        device=reference.device, dtype=reference.dtype,
    )


def derive_static_twin(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every ODConv layer replaced by a static conv of its geometry.

    Train-form ODConv layers of any class (found by structure with
    :func:`~odconv_deploy.reparameterize.find_odconv_layers`) and deploy-form layers
    (:class:`~odconv_deploy.layers.ODConv2dDeploy`, as left by
    :func:`~odconv_deploy.reparameterize.convert_model`) are each replaced by the
    ``nn.Conv2d`` of :func:`static_conv_for`; everything else is kept as it is. A module
    registered under several names is replaced under all of them. A model that is itself one
    ODConv layer gives a single conv.

    The twin is a latency baseline, not a trained model: all its parameters and BatchNorm
    statistics are then filled with :func:`~odconv_deploy.synthetic.synthesize_weights`
    (deterministic for a given ``seed``), because weights do not change latency. Its outputs
    have the shapes of the original's, not its values.

    Args:
        model: Any network. It is deep-copied and never modified.
        seed: Seed of the synthetic weights.

    Returns:
        The twin, in eval mode. For a model without ODConv layers this is simply a copy (with
        synthetic weights); no error is raised.

    Raises:
        UnsupportedLayerError: An ODConv-like layer whose configuration cannot be read.
    """
    twin = copy.deepcopy(model)
    train_layers = find_odconv_layers(twin)
    if isinstance(twin, ODConv2dDeploy) or any(name == "" for name, _ in train_layers):
        return synthesize_weights(static_conv_for(twin, type(twin).__name__), seed=seed)
    replacements: dict[int, nn.Conv2d] = {}
    for name, layer in train_layers:
        replacements[id(layer)] = static_conv_for(layer, name)
    # Deploy forms are skipped by find_odconv_layers; look at every registration (duplicates
    # included) so that shared modules are replaced wherever they appear.
    for name, module in twin.named_modules(remove_duplicate=False):
        if isinstance(module, ODConv2dDeploy) and id(module) not in replacements:
            replacements[id(module)] = static_conv_for(module, name)
    if replacements:
        parents = list(twin.modules())  # snapshot: replaced layers' children are not visited
        for parent in parents:
            # _modules, not named_children(): that one skips a child's second attribute name.
            for child_name, child in list(parent._modules.items()):
                if id(child) in replacements:
                    setattr(parent, child_name, replacements[id(child)])
    return synthesize_weights(twin, seed=seed)
