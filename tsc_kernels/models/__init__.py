"""TSC residual networks: torchvision's ResNet family and CIFAR ResNets with adaptive step sizes.

Every builder takes ``tsc="lstm" | "2fc" | "indp" | "fixed" | None`` (None: the plain network),
``reduction`` (controller hidden size H = max(1, C // reduction); default 4 for basic blocks, 8 for
bottlenecks, docs/tsc.md) and ``dt`` (tsc="fixed" only: the constant step size, default 1.0).

Architecture (docs/tsc.md):
- A TSC block is a torchvision ``BasicBlock`` / ``Bottleneck`` (or one of this module's SE and
  pre-activation blocks) whose class has been swapped for a subclass: its submodules and therefore
  its state_dict keys (``layer1.0.conv1.weight`` …) are exactly those of the plain block. Its
  forward takes the block's Δt as an argument and ends with the fused
  ``residual_update(shortcut, F, Δt, relu=True)`` (post-activation, ReLU fused) or ``relu=False``
  (pre-activation CIFAR blocks, whose F ends with a conv).
- The network owns one ``tsc_kernels.nn.NetworkController`` under the prefix ``tsc_controller.``
  (``tsc_controller.stages.0.fc_in.weight`` …). Its forward runs the controller once, before the
  stages, for every block of every stage, then hands each block its row of Δt as an argument
  (no state is written during forward, so it traces and compiles).
- Δt depends on weights only. In eval mode with autograd off (``torch.no_grad`` /
  ``torch.inference_mode``) it is computed once and cached; the cache key holds the data pointer and
  autograd version counter of every tensor the controller reads (conv weights and controller
  parameters), so optimizer steps, ``load_state_dict``, ``.to()`` and in-place edits under
  ``torch.no_grad`` all invalidate it. Writes through ``tensor.data`` bypass version counters: call
  ``model.clear_step_size_cache()`` after those. With autograd on (training, or eval while taking
  gradients) Δt is recomputed every forward so its gradient is always right.

Models: ``resnet18/34/50/101/152``, ``resnext50_32x4d``, ``resnext101_32x8d``, ``wide_resnet50_2``
(torchvision's architectures, built with ``weights=None`` unless ``weights`` is passed),
``se_resnet50/101`` (squeeze-excitation inside F after the last BN, before ⊗Δt: torchvision's
``ResNet`` class with ``SEBottleneck`` blocks, SE reduction 16), ``cifar_resnet(depth)`` and
``resnet1d(depth)`` (CIFAR-style ResNets of Conv1d / BatchNorm1d blocks for sequences),
``lm_resnet18/34/50/101``, ``lm_resnext50_32x4d`` and ``cifar_lm_resnet(depth)`` (LM-ResNets, the
linear multi-step architecture, docs/lm_resnet.md).
timm's ResNet family converts with ``tsc_kernels.convert(timm.create_model(...))``: its TSC classes
live in ``timm_resnet``, imported on demand so that timm stays optional (docs/timm.md).

Parameter counts: TSC_LSTM adds 1,830,960 to ResNet-18/34 and 2,271,200 to ResNet-50/101 (the
paper's +1.83 M / +2.27 M). For ResNeXt-50 32x4d the paper lists +2.27 M, which corresponds to a
conv1 width of C/4; this library reads the real conv shapes (conv1 width C/2 in ResNeXt-50), so the
controller's input is wider and it adds 2,445,280 (+2.45 M).
"""
from .blocks import (PLAIN_TO_TSC_BLOCK, PreActBasicBlock, PreActBottleneck, SEBottleneck,
                     TSCBasicBlock, TSCBottleneck, TSCPreActBasicBlock, TSCPreActBottleneck, TSCSEBottleneck,
                     is_tsc_block, register_block)
from .cifar import CIFARResNet, TSCCIFARResNet, cifar_resnet
from .densenet import (CIFARDenseNet, DenseBlock, DenseLayer, TSCBottleneckDenseLayer, TSCCIFARDenseNet,
                       TSCDenseLayer, TSCDenseNet, cifar_densenet, densenet121, densenet161, densenet169, densenet201)
from .resnet1d import BasicBlock1d, ResNet1d, TSCBasicBlock1d, TSCResNet1d, resnet1d
from .lm_resnet import (CIFARLMResNet, LMResNet, TSCCIFARLMResNet, TSCLMResNet, cifar_lm_resnet, lm_coefficients,
                        lm_resnet18, lm_resnet34, lm_resnet50, lm_resnet101, lm_resnext50_32x4d)
from .network import (PLAIN_TO_TSC_NETWORK, build_controller, is_tsc_network, register_network,
                      stage_shapes)
from .resnet import (TSCResNet, resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d,
                     resnext101_32x8d, se_resnet50, se_resnet101, wide_resnet50_2)

__all__ = [
    "BasicBlock1d", "ResNet1d", "TSCBasicBlock1d", "TSCResNet1d", "resnet1d",
    "CIFARResNet", "PreActBasicBlock", "PreActBottleneck", "SEBottleneck", "TSCBasicBlock",
    "TSCBottleneck", "TSCCIFARResNet", "TSCPreActBasicBlock", "TSCPreActBottleneck", "TSCResNet",
    "TSCSEBottleneck", "cifar_resnet", "is_tsc_block", "is_tsc_network", "resnet18", "resnet34", "resnet50",
    "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "se_resnet50", "se_resnet101",
    "wide_resnet50_2",
    # DenseNets (docs/densenet.md)
    "CIFARDenseNet", "DenseBlock", "DenseLayer", "TSCBottleneckDenseLayer", "TSCCIFARDenseNet", "TSCDenseLayer",
    "TSCDenseNet", "cifar_densenet", "densenet121", "densenet161", "densenet169", "densenet201",
    # LM-ResNets (docs/lm_resnet.md)
    "CIFARLMResNet", "LMResNet", "TSCCIFARLMResNet", "TSCLMResNet", "cifar_lm_resnet", "lm_coefficients",
    "lm_resnet18", "lm_resnet34", "lm_resnet50", "lm_resnet101", "lm_resnext50_32x4d",
    # for new model families: registries and controller construction
    "PLAIN_TO_TSC_BLOCK", "PLAIN_TO_TSC_NETWORK", "build_controller", "register_block", "register_network",
    "stage_shapes",
]
