"""``convert(model)``: turn a plain residual network into its TSC version in place, keeping every weight.

Supported: ``torchvision.models.ResNet`` instances (ResNet-18…152, ResNeXt, Wide ResNet, pretrained
or not, any ``num_classes`` / ``norm_layer`` / ``replace_stride_with_dilation``) whose stages hold
torchvision ``BasicBlock`` / ``Bottleneck`` blocks, and the plain networks of ``tsc_kernels.models``
(SE-ResNets, CIFAR ResNets, CIFAR DenseNets), torchvision's ``DenseNet`` (densenet121/161/169/201:
docs/densenet.md), and timm's ``ResNet`` with its ``BasicBlock`` / ``Bottleneck`` (ResNet,
ResNeXt, SE-ResNet, Wide ResNet, any stem, anti-aliasing, drop-path, drop-block: docs/timm.md).
Conversion swaps the classes of the network and its blocks for their TSC subclasses (no submodule
is created, copied or re-initialised) and adds one controller under ``tsc_controller``. Everything
is checked before anything changes, so a failed conversion leaves the model untouched.

The conversion core lives in tsc_kernels/models/conversion.py (beside the registries it reads and the
builders that call it); this module is its public name.
"""
from .models.conversion import convert

__all__ = ["convert"]
