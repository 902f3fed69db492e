"""Classifier exporter: a torchvision ResNet -> a forward graph, a functional SGD train-step graph and
the initial train state, in one cip model directory.

Directory contents (models/README.md, section "classifier", is the contract):

- `model.onnx` + `model.onnx.data`: the eval-mode forward graph, `images` [batch, 3, S, S] ->
  `logits` [batch, N]. Every weight and BN running statistic is an initializer named exactly like
  the train-state tensor it comes from (`param.<name>`, `state.<name>`), stored as external data at
  an offset recorded in the manifest. cip writes a trained model by copying `model.onnx` and
  rewriting only the data file from a train state; nothing is folded or renamed (see
  `export_forward`).
- `train_step.onnx`: one step of `torch.optim.SGD` (dampening 0) after `CrossEntropyLoss` with
  label smoothing, the model in train mode (BN normalises with batch statistics and updates its
  running stats with momentum 0.1 and the unbiased variance). Inputs `param.*`, `momentum_buf.*`,
  `state.*`, `images`, `labels`, and the f32 scalars `lr`, `momentum`, `weight_decay`, `nesterov`
  (0/1), `label_smoothing`; outputs `new.<input name>` for every train-state input, then `loss`. The
  batch dimension is dynamic (`batch`, at least 2: BN in train mode needs two values per channel).
- `train_step_gemm.onnx`: the same step, same inputs and outputs, with activations laid out
  [C, H, W, B] and every convolution and its two gradients as one GEMM over the batch
  (`channels_first_forward`): about twice as fast on ONNX Runtime's CPU kernels. cip runs it on the
  CPU and `train_step.onnx` (cuDNN's convolutions) on a GPU.
- `state.safetensors`: the initial train state, named exactly like the train-step inputs, momentum
  buffers zero. A zero buffer is exact for torch's first step: torch sets buf = d_p there, and
  momentum * 0 + d_p = d_p.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet

from .common import write_manifest

ARCHS = ("resnet18", "resnet50", "resnet-tiny")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# resnet-tiny: torchvision's ResNet skeleton and BasicBlock, one block per stage, narrow stages so
# that the fixture with its SGD references stays well under its size budget.
TINY_WIDTHS = (4, 8, 12, 16)

FORWARD_GRAPH = "model.onnx"
FORWARD_DATA = "model.onnx.data"
TRAIN_STEP_GRAPH = "train_step.onnx"
TRAIN_STEP_GEMM_GRAPH = "train_step_gemm.onnx"
# Manifest role of each train-step graph: cip runs the GEMM form on the CPU, the convolution form
# (cuDNN's kernels) on a GPU.
TRAIN_STEP_GRAPHS = {"train_step": TRAIN_STEP_GRAPH, "train_step_gemm": TRAIN_STEP_GEMM_GRAPH}
STATE_FILE = "state.safetensors"
# Offsets of the forward weights in model.onnx.data are multiples of this (any reader can map the
# file and view each tensor in place).
DATA_ALIGNMENT = 64
SCALAR_INPUTS = ("lr", "momentum", "weight_decay", "nesterov", "label_smoothing")
BATCH_DIM = "batch"
# BN in train mode needs at least two values per channel; torch.export also specialises sizes 0/1.
MIN_TRAIN_BATCH = 2
# Example batch used while tracing the train step; the graph does not depend on it (the batch dim is
# symbolic). A prime avoids coinciding with any channel/class/spatial size.
TRACE_BATCH = 5

FIXTURE_NAME = "resnet-tiny"
FIXTURE_CLASSES = 10
FIXTURE_IMAGE_SIZE = 32
FIXTURE_SEED = 0
# Hyper-parameters of the committed SGD references (the paper's ImageNette recipe, lr 0.1).
REFERENCE_LR = 0.1
REFERENCE_MOMENTUM = 0.9
REFERENCE_WEIGHT_DECAY = 5e-4
# The two consecutive reference steps use different batch sizes, so that a consumer also exercises
# the dynamic batch dimension.
REFERENCE_BATCHES = (8, 10)
# The long-run reference: this many steps over the two reference batches in turn (1, 2, 1, 2, ...).
TEN_STEPS = 10
FORWARD_REFERENCE_BATCH = 4


# ----------------------------------------------------------------------------------------------
# Models


class TinyResNet(ResNet):
    """torchvision's ResNet with narrow stages: same module tree and parameter names as resnet18.

    torchvision hard-codes the stage widths 64/128/256/512, so this reruns its constructor's steps
    with other widths; `_make_layer`, `BasicBlock`, `forward` and the weight init are torchvision's.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = TINY_WIDTHS, blocks: Sequence[int] = (1, 1, 1, 1)):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # BasicBlock only accepts the default width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], blocks[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_model(arch: str, num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised torchvision-style ResNet (random weights from `seed`)."""
    import torchvision

    torch.manual_seed(seed)
    if arch == "resnet18":
        return torchvision.models.resnet18(num_classes=num_classes)
    if arch == "resnet50":
        return torchvision.models.resnet50(num_classes=num_classes)
    if arch == "resnet-tiny":
        return TinyResNet(num_classes)
    raise ValueError(f"unknown classifier arch {arch!r}; choose one of {', '.join(ARCHS)}")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict file (`.safetensors`, or a torch.save'd dict) into `model`, strictly.

    `num_batches_tracked` may be missing: it never enters the math (BN momentum is fixed at 0.1).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{path}: state_dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(check --arch and --num-classes)"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------
# Train state


@dataclass(frozen=True)
class TrainStateLayout:
    """Names of the train-state tensors, in graph-input order.

    `params` / `stats` are module names (`layer1.0.conv1.weight`, `bn1.running_mean`); the graph and
    state-file names carry the prefixes `param.`, `momentum_buf.`, `state.`.
    """

    params: tuple[str, ...]
    stats: tuple[str, ...]

    @staticmethod
    def of(model: nn.Module) -> "TrainStateLayout":
        params = tuple(n for n, _ in model.named_parameters())
        stats = tuple(n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var")))
        return TrainStateLayout(params, stats)

    @property
    def param_inputs(self) -> list[str]:
        return [f"param.{n}" for n in self.params]

    @property
    def momentum_inputs(self) -> list[str]:
        return [f"momentum_buf.{n}" for n in self.params]

    @property
    def state_inputs(self) -> list[str]:
        return [f"state.{n}" for n in self.stats]

    @property
    def tensor_inputs(self) -> list[str]:
        """Every train-state tensor, in graph-input (and state-file) order."""
        return self.param_inputs + self.momentum_inputs + self.state_inputs

    @property
    def weight_inputs(self) -> list[str]:
        """The train-state tensors that the forward graph needs: params and BN running stats."""
        return self.param_inputs + self.state_inputs

    @property
    def step_inputs(self) -> list[str]:
        return self.tensor_inputs + ["images", "labels", *SCALAR_INPUTS]

    @property
    def step_outputs(self) -> list[str]:
        return [f"new.{n}" for n in self.tensor_inputs] + ["loss"]


def train_state_of(model: nn.Module, layout: TrainStateLayout) -> dict[str, torch.Tensor]:
    """The train state of `model` (momentum buffers zero), keyed by graph-input name."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state: dict[str, torch.Tensor] = {}
    for n in layout.params:
        state[f"param.{n}"] = params[n].detach().clone().contiguous()
    for n in layout.params:
        state[f"momentum_buf.{n}"] = torch.zeros_like(params[n]).contiguous()
    for n in layout.stats:
        state[f"state.{n}"] = buffers[n].detach().clone().contiguous()
    return state


def load_train_state(model: nn.Module, layout: TrainStateLayout, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy params and BN running stats from a train state (keys `<prefix>param.*`, `<prefix>state.*`)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for n in layout.params:
            params[n].copy_(state[f"{prefix}param.{n}"])
        for n in layout.stats:
            buffers[n].copy_(state[f"{prefix}state.{n}"])


def _without_batch_counters(model: nn.Module) -> nn.Module:
    """A copy whose BNs have no `num_batches_tracked`: with momentum 0.1 it never enters the math,
    and an integer counter would otherwise have to travel through the graph as state."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.momentum is None:
                raise ValueError("BN with momentum=None (cumulative average) needs num_batches_tracked; not supported")
            m.num_batches_tracked = None
    return model


# ----------------------------------------------------------------------------------------------
# The functional train step


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: torch.Tensor) -> torch.Tensor:
    """`nn.CrossEntropyLoss(label_smoothing=eps)` (mean reduction) with eps a tensor, so that it can
    be a graph input: (1 - eps) * NLL + eps * mean over classes of -log p."""
    log_probs = torch.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1).mean()
    uniform = -log_probs.mean(dim=1).mean()
    return (1 - label_smoothing) * nll + label_smoothing * uniform


StepForward = Callable[[dict, dict, torch.Tensor], tuple[torch.Tensor, dict]]


def module_forward(model: nn.Module) -> StepForward:
    """The model's own forward (torchvision's modules, NCHW): BN updates its running stats in place,
    so it gets copies, returned as the new stats."""

    def forward(params: dict, stats_in: dict, images: torch.Tensor):
        stats = {n: s.clone() for n, s in stats_in.items()}
        logits = torch.func.functional_call(model, {**params, **stats}, (images,))
        return logits, stats

    return forward


def make_train_step(
    model: nn.Module, layout: TrainStateLayout, forward: StepForward | None = None
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The SGD step as a function of flat tensors in `layout.step_inputs` order, returning tensors in
    `layout.step_outputs` order. `model` must be in train mode without BN batch counters; `forward`
    (default: the model's own) maps params, BN stats and images to logits and the new BN stats."""
    n_params, n_stats = len(layout.params), len(layout.stats)
    forward = forward or module_forward(model)

    def step(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = dict(zip(layout.params, flat[:n_params]))
        buffers = flat[n_params : 2 * n_params]
        stats_in = dict(zip(layout.stats, flat[2 * n_params : 2 * n_params + n_stats]))
        images, labels, lr, momentum, weight_decay, nesterov, label_smoothing = flat[2 * n_params + n_stats :]

        def loss_of(params: dict[str, torch.Tensor]):
            logits, new_stats = forward(params, stats_in, images)
            return cross_entropy(logits, labels, label_smoothing), new_stats

        grads, (loss, new_stats) = torch.func.grad_and_value(loss_of, has_aux=True)(params)
        # torch.optim.SGD, dampening 0: d_p = g + wd*p; buf = momentum*buf + d_p;
        # nesterov: d_p += momentum*buf, else d_p = buf; p -= lr*d_p. Both rules in one:
        # p -= a*d_p + b*buf with scalar a = lr*nesterov, b = lr*(1 + nesterov*(momentum - 1)),
        # no per-element select (ORT's CPU Where is slow).
        step_d_p = lr * nesterov
        step_buf = lr * (1 + nesterov * (momentum - 1))
        # On flattened tensors: ORT's CPU broadcast of a scalar against a [K, C, 1, 1] weight (every
        # 1x1 conv) goes element by element, ~70x slower than against the same data in 1-D.
        new_params, new_buffers = [], []
        for name, buf in zip(layout.params, buffers):
            p, g, shape = params[name].reshape(-1), grads[name].reshape(-1), buf.shape
            d_p = g + weight_decay * p
            new_buf = momentum * buf.reshape(-1) + d_p
            new_params.append((p - step_d_p * d_p - step_buf * new_buf).reshape(shape))
            new_buffers.append(new_buf.reshape(shape))
        return (*new_params, *new_buffers, *(new_stats[n] for n in layout.stats), loss)

    return step


# ----------------------------------------------------------------------------------------------
# The GEMM train step: the same step for ONNX Runtime's CPU provider.
#
# ORT's CPU Conv runs one small im2col GEMM per image, and its ConvTranspose (the input gradient)
# is slower still: at ResNet-18's late stages (2x2 pixels) such a GEMM has 4 columns. Here
# activations are [C, H, W, B] (batch innermost), so that every convolution and both of its
# gradients are one GEMM over the whole batch, and the im2col slices copy runs of Wo*B floats.


def _im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], flip: bool = False):
    """x [C, H, W, B] -> (columns [C*kh*kw, Ho*Wo*B], row (c*kh + i)*kw + j, so that a weight
    [K, C, kh, kw] is its GEMM matrix as it is; (Ho, Wo)). `flip` takes the taps in reverse order:
    the columns of a convolution by the spatially flipped kernel."""
    channels, height, width, _ = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    if (ph, pw) != (0, 0):
        x = torch.nn.functional.pad(x, (0, 0, pw, pw, ph, ph))
    offsets = [(i, j) for i in range(kh) for j in range(kw)]
    if flip:
        offsets.reverse()
    taps = [x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw] for i, j in offsets]
    cols = taps[0] if len(taps) == 1 else torch.stack(taps, dim=1)
    return cols.reshape(channels * kh * kw, -1), (out_h, out_w)


def _conv_gemm(x: torch.Tensor, weight: torch.Tensor, stride, padding):
    """Convolution of x [C, H, W, B] by weight [K, C, kh, kw] -> ([K, Ho, Wo, B], the columns)."""
    k = weight.shape[0]
    cols, (out_h, out_w) = _im2col(x, tuple(weight.shape[2:]), stride, padding)
    y = weight.reshape(k, -1) @ cols
    return y.reshape(k, out_h, out_w, x.shape[3]), cols


# Batch size at which the exporter weighs a weight transpose against activation copies (the graph
# itself serves every batch size).
NOMINAL_BATCH = 32


def _conv_input_grad(dy: torch.Tensor, weight: torch.Tensor, in_hw: tuple[int, int], stride, padding) -> torch.Tensor:
    """Gradient of the input [C, H, W, B] from dy [K, Ho, Wo, B], in whichever of two forms moves
    less memory. Stride 1 with activations larger than the weight (early stages): the convolution
    of dy by the transposed, flipped kernel (a copy of the weight, then dy's columns and one GEMM).
    Otherwise: the columns' gradient (one GEMM by the transposed weight matrix, no weight copy)
    folded back onto the padded input (col2im), which writes each input position kh*kw times.

    Tap (i, j) of output (m, n) lands on padded position (s*m + i, s*n + j). The positions of one
    residue (r_y, r_x) mod the stride form a sub-grid that only the taps of that residue reach,
    each shifted by whole cells: a sum of zero-padded copies. The sub-grids are then interleaved.
    """
    k, channels, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    out_h, out_w, batch = dy.shape[1], dy.shape[2], dy.shape[3]
    stride_one = (sh, sw) == (1, 1) and (kh, kw) != (1, 1) and kh - 1 >= ph and kw - 1 >= pw
    if stride_one and weight.numel() < k * out_h * out_w * NOMINAL_BATCH:
        cols, _ = _im2col(dy, (kh, kw), (1, 1), (kh - 1 - ph, kw - 1 - pw), flip=True)
        dx = weight.transpose(0, 1).reshape(channels, -1) @ cols
        return dx.reshape(channels, in_hw[0], in_hw[1], batch)
    dcols = (weight.reshape(k, -1).t() @ dy.reshape(k, -1)).reshape(channels, kh, kw, out_h, out_w, batch)
    sub_h, sub_w = -(-(in_hw[0] + 2 * ph) // sh), -(-(in_hw[1] + 2 * pw) // sw)
    rows = []
    for ry in range(sh):
        cells = []
        for rx in range(sw):
            cell = None
            for i in range(ry, kh, sh):
                for j in range(rx, kw, sw):
                    u, v = i // sh, j // sw
                    pads = (0, 0, v, sub_w - out_w - v, u, sub_h - out_h - u)
                    part = dcols[:, i, j]
                    part = torch.nn.functional.pad(part, pads) if any(pads) else part
                    cell = part if cell is None else cell + part
            cells.append(cell if cell is not None else dy.new_zeros(channels, sub_h, sub_w, batch))
        rows.append(cells[0] if sw == 1 else torch.stack(cells, dim=3))  # [C, Mh, Mw, sw, B]
    grid = rows[0] if sh == 1 else torch.stack(rows, dim=2)  # [C, Mh, sh, Mw, sw, B]
    padded = grid.reshape(channels, sub_h * sh, sub_w * sw, batch)
    return padded[:, ph : ph + in_hw[0], pw : pw + in_hw[1]]


class _ConvGemm(torch.autograd.Function):
    """A bias-free convolution on [C, H, W, B] activations; its gradients are GEMMs too."""

    @staticmethod
    def forward(x, weight, stride, padding):
        return _conv_gemm(x, weight, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, stride, padding = inputs
        _, cols = output
        ctx.mark_non_differentiable(cols)
        ctx.save_for_backward(weight, cols)
        ctx.stride, ctx.padding, ctx.in_hw = stride, padding, tuple(x.shape[1:3])

    @staticmethod
    def backward(ctx, dy, _dcols):
        weight, cols = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _conv_input_grad(dy, weight, ctx.in_hw, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            dw = (dy.reshape(weight.shape[0], -1) @ cols.t()).reshape(weight.shape)
        return dx, dw, None, None


class _Relu(torch.autograd.Function):
    """ReLU whose gradient is dy * (y > 0): ORT's CPU Where (autograd's threshold_backward) is
    about ten times slower than a compare, a cast and a multiply."""

    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * (y > 0).to(dy.dtype)


class _BatchNormTrain(torch.autograd.Function):
    """BN in train mode on [C, H, W, B]: normalise with the batch's statistics (biased variance).
    Returns (y, xhat, rstd, mean, biased var); only y is differentiated (xhat and rstd are returned
    for the backward pass to save, mean and var for the running statistics)."""

    @staticmethod
    def forward(x, weight, bias, eps):
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=(1, 2, 3), keepdim=True)
        rstd = torch.rsqrt(var + eps)
        xhat = centered * rstd
        y = xhat * weight[:, None, None, None] + bias[:, None, None, None]
        return y, xhat, rstd, mean.reshape(-1), var.reshape(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, weight, _, _ = inputs
        _, xhat, rstd, mean, var = output
        ctx.mark_non_differentiable(xhat, rstd, mean, var)
        ctx.save_for_backward(weight, xhat, rstd)

    @staticmethod
    def backward(ctx, dy, *_):
        weight, xhat, rstd = ctx.saved_tensors
        count = xhat.numel() // xhat.shape[0]
        grad_bias = dy.sum(dim=(1, 2, 3))
        grad_weight = (dy * xhat).sum(dim=(1, 2, 3))
        per_channel = lambda v: v[:, None, None, None]  # noqa: E731
        dx = (per_channel(weight) * rstd) * (dy - per_channel(grad_bias / count) - xhat * per_channel(grad_weight / count))
        return dx, grad_weight, grad_bias, None


def channels_first_forward(model: nn.Module) -> StepForward:
    """torchvision's ResNet forward (train mode) written out over [C, H, W, B] activations with
    _ConvGemm, _BatchNormTrain and _Relu; the module tree only supplies names and hyper-parameters.
    Same function as `module_forward`, checked against torch.optim.SGD by the parity tests."""
    from torchvision.models.resnet import Bottleneck

    def conv(prefix: str, params: dict, x: torch.Tensor) -> torch.Tensor:
        m = model.get_submodule(prefix)
        if m.bias is not None or m.groups != 1 or tuple(m.dilation) != (1, 1):
            raise NotImplementedError(f"{prefix}: the GEMM train step handles bias-free, ungrouped, undilated convs (ResNet)")
        return _ConvGemm.apply(x, params[f"{prefix}.weight"], tuple(m.stride), tuple(m.padding))[0]

    def forward(params: dict, stats_in: dict, images: torch.Tensor):
        new_stats: dict[str, torch.Tensor] = {}

        def bn(prefix: str, x: torch.Tensor) -> torch.Tensor:
            m = model.get_submodule(prefix)
            y, _, _, mean, var = _BatchNormTrain.apply(x, params[f"{prefix}.weight"], params[f"{prefix}.bias"], m.eps)
            count = x.numel() // x.shape[0]
            for stat, batch_value in (("running_mean", mean), ("running_var", var * (count / (count - 1)))):
                name = f"{prefix}.{stat}"
                new_stats[name] = (1 - m.momentum) * stats_in[name] + m.momentum * batch_value
            return y

        relu = _Relu.apply
        x = images.permute(1, 2, 3, 0)
        x = relu(bn("bn1", conv("conv1", params, x)))
        # ORT's MaxPool (and its gradient) want the spatial axes last: [C, B, H, W] for this one op.
        pool = model.maxpool
        x = torch.nn.functional.max_pool2d(x.permute(0, 3, 1, 2), pool.kernel_size, pool.stride, pool.padding).permute(0, 2, 3, 1)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for index, block in enumerate(model.get_submodule(stage)):
                p = f"{stage}.{index}"
                identity = x
                out = relu(bn(f"{p}.bn1", conv(f"{p}.conv1", params, x)))
                out = bn(f"{p}.bn2", conv(f"{p}.conv2", params, out))
                if isinstance(block, Bottleneck):
                    out = bn(f"{p}.bn3", conv(f"{p}.conv3", params, relu(out)))
                if block.downsample is not None:
                    identity = bn(f"{p}.downsample.1", conv(f"{p}.downsample.0", params, x))
                x = relu(out + identity)
        features = x.mean(dim=(1, 2))  # [C, B]
        logits = features.t() @ params["fc.weight"].t() + params["fc.bias"]
        return logits, new_stats

    return forward


def _convolution_backward(
    grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask
):
    """aten.convolution_backward as forward convolutions (it has neither an ONNX translation nor a
    torch decomposition). grad_input is the transposed convolution of grad_output, with the output
    padding that restores the input size; grad_weight correlates the input with grad_output over the
    batch (batch and channel axes swapped, stride and dilation swapped), cropped to the kernel."""
    aten = torch.ops.aten
    if transposed or groups != 1:
        raise NotImplementedError("convolution_backward: only non-transposed, groups=1 convolutions (ResNet)")
    kernel = weight.shape[2:]
    spatial = len(kernel)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        restore = []
        for i in range(spatial):
            covered = (grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1
            restore.append(input.shape[2 + i] - covered)
        grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, restore, 1)
    if output_mask[1]:
        swapped = aten.convolution(
            input.transpose(0, 1), grad_output.transpose(0, 1), None, dilation, padding, stride, False, [0] * spatial, 1
        )
        grad_weight = swapped.transpose(0, 1)
        for i in range(spatial):
            grad_weight = grad_weight.narrow(2 + i, 0, kernel[i])
    if output_mask[2]:
        grad_bias = grad_output.sum([0, *range(2, grad_output.dim())])
    return grad_input, grad_weight, grad_bias


def _train_step_decompositions() -> dict:
    """Core-ATen decompositions plus the ones the train step needs for a correct ONNX graph.

    Batch norm MUST be decomposed here (var_mean/rsqrt): the ONNX translation of
    `_native_batch_norm_legit_functional` hard-codes eval mode, which silently exports a "training"
    graph that normalises with the running statistics (pitfalls.md).
    """
    from torch._decomp import core_aten_decompositions, get_decompositions

    aten = torch.ops.aten
    table = dict(core_aten_decompositions())
    table.update(
        get_decompositions(
            [
                aten._native_batch_norm_legit_functional,
                aten._native_batch_norm_legit,
                aten.native_batch_norm,
                aten.native_batch_norm_backward,
                aten.max_pool2d_with_indices_backward,
            ]
        )
    )
    table[aten.convolution_backward.default] = _convolution_backward
    return table


def _example_step_inputs(state: dict[str, torch.Tensor], layout: TrainStateLayout, image_size: int, num_classes: int, batch: int):
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch, dtype=torch.int64) % num_classes
    scalars = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.9, 5e-4, 0.0, 0.0)]
    return (*(state[n] for n in layout.tensor_inputs), images, labels, *scalars)


def export_train_step(
    model: nn.Module, layout: TrainStateLayout, image_size: int, num_classes: int, out_path: Path, *, gemm: bool = False
) -> dict:
    """Trace the functional SGD step and write it as an ONNX graph with a dynamic batch; `gemm`
    writes the channels-first GEMM form (`channels_first_forward`) instead of torchvision's modules.

    make_fx flattens the torch.func step (torch.export fails on it directly) to ATen ops, tracing
    with symbolic shapes (duck shaping off, so the batch shares its symbol with no other size) so that
    nothing is specialised to the example batch; torch.export then re-traces that graph with only
    the batch dynamic, and refuses if any op had baked the example batch in.
    """
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    train_model = _without_batch_counters(model).train()
    step = make_train_step(train_model, layout, channels_first_forward(train_model) if gemm else None)
    state = train_state_of(train_model, layout)
    args = _example_step_inputs(state, layout, image_size, num_classes, TRACE_BATCH)
    timings = {}
    t0 = time.perf_counter()
    with fx_config.patch(use_duck_shape=False):
        # The GEMM step mutates nothing (and functionalize cannot see into autograd.Functions).
        flat_graph = make_fx(
            step if gemm else torch.func.functionalize(step, remove="mutations_and_views"),
            decomposition_table=_train_step_decompositions(),
            tracing_mode="symbolic",
        )(*args)
    timings["trace_s"] = time.perf_counter() - t0

    batch = torch.export.Dim(BATCH_DIM, min=MIN_TRAIN_BATCH)
    n_state = len(layout.tensor_inputs)
    dynamic_shapes = (*([None] * n_state), {0: batch}, {0: batch}, *([None] * len(SCALAR_INPUTS)))
    t0 = time.perf_counter()
    program = torch.export.export(flat_graph, args, dynamic_shapes=dynamic_shapes, strict=False).run_decompositions()
    timings["torch_export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    onnx_program = torch.onnx.export(
        program, dynamo=True, input_names=layout.step_inputs, output_names=layout.step_outputs, verbose=False
    )
    timings["onnx_export_s"] = time.perf_counter() - t0
    proto = onnx_program.model_proto
    _check_io_names(proto, layout.step_inputs, layout.step_outputs, out_path.name)
    _name_batch_dim(proto, {"images": 0, "labels": 0})
    _strip_metadata(proto)
    import onnx

    onnx.save_model(proto, str(out_path))
    onnx.checker.check_model(str(out_path))
    return {"nodes": len(proto.graph.node), **timings}


# ----------------------------------------------------------------------------------------------
# The forward graph


class _ForwardFromState(nn.Module):
    """The eval-mode model with its weights as inputs, so that the ONNX optimiser cannot fold BN
    into convs, drop zero biases or deduplicate equal tensors: every weight reaches the graph
    unchanged and under its train-state name."""

    def __init__(self, model: nn.Module, layout: TrainStateLayout):
        super().__init__()
        self.model = model
        self.module_names = list(layout.params) + list(layout.stats)

    def forward(self, images: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.module_names, weights)), (images,))


def export_forward(model: nn.Module, layout: TrainStateLayout, image_size: int, out_dir: Path) -> tuple[list[dict], dict]:
    """Write model.onnx with its weights in model.onnx.data; return the initializer records."""
    import onnx
    from onnx import TensorProto

    eval_model = _without_batch_counters(model).eval()
    state = train_state_of(eval_model, layout)
    weights = [state[n] for n in layout.weight_inputs]
    example = torch.zeros(2, 3, image_size, image_size)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # The exporter cannot rename axes through the nested weight list; _name_batch_dim does.
        warnings.filterwarnings("ignore", message=".*different number of inputs than the flatten dynamic_shapes")
        onnx_program = torch.onnx.export(
            _ForwardFromState(eval_model, layout).eval(),
            (example, weights),
            dynamo=True,
            input_names=["images", *layout.weight_inputs],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim(BATCH_DIM, min=1)}, [None] * len(weights)),
            verbose=False,
        )
    export_s = time.perf_counter() - t0
    proto = onnx_program.model_proto
    _check_io_names(proto, ["images", *layout.weight_inputs], ["logits"], FORWARD_GRAPH)
    _name_batch_dim(proto, {"images": 0})
    _strip_metadata(proto)

    # Turn the weight inputs into initializers stored in model.onnx.data at aligned offsets.
    weight_set = set(layout.weight_inputs)
    kept_inputs = [v for v in proto.graph.input if v.name not in weight_set]
    del proto.graph.input[:]
    proto.graph.input.extend(kept_inputs)
    records = []
    offset = 0
    with open(out_dir / FORWARD_DATA, "wb") as data:
        for name in layout.weight_inputs:
            tensor = state[name]
            if tensor.dtype != torch.float32:
                raise ValueError(f"{name}: forward weights must be float32, got {tensor.dtype}")
            raw = tensor.numpy().astype("<f4", copy=False).tobytes()
            pad = (-offset) % DATA_ALIGNMENT
            data.write(b"\0" * pad)
            offset += pad
            data.write(raw)
            init = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(tensor.shape))
            init.data_location = TensorProto.EXTERNAL
            for key, value in (("location", FORWARD_DATA), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            proto.graph.initializer.append(init)
            records.append(
                {"name": name, "offset": offset, "length": len(raw), "dtype": "float32", "shape": list(tensor.shape), "source": name}
            )
            offset += len(raw)
    onnx.save_model(proto, str(out_dir / FORWARD_GRAPH))
    onnx.checker.check_model(str(out_dir / FORWARD_GRAPH))
    _check_forward_initializers(out_dir / FORWARD_GRAPH, weight_set)
    return records, {"nodes": len(proto.graph.node), "export_s": export_s}


def _check_forward_initializers(path: Path, weight_names: set[str]) -> None:
    """Every float initializer of the forward graph must be a train-state tensor in the data file;
    anything else (a folded or renamed weight) would make the trained copy wrong."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        external = init.data_location == onnx.TensorProto.EXTERNAL
        if init.name in weight_names:
            if not external:
                raise RuntimeError(f"{path.name}: weight {init.name} is not stored in {FORWARD_DATA}")
        elif external or init.data_type != onnx.TensorProto.INT64:
            raise RuntimeError(f"{path.name}: initializer {init.name} is not a train-state tensor (a folded weight?)")


# ----------------------------------------------------------------------------------------------
# ONNX helpers


def _check_io_names(proto, inputs: Sequence[str], outputs: Sequence[str], what: str) -> None:
    got_in = [v.name for v in proto.graph.input]
    got_out = [v.name for v in proto.graph.output]
    if got_in != list(inputs) or got_out != list(outputs):
        raise RuntimeError(f"{what}: exported I/O names differ from the requested ones: {got_in[:4]}... -> {got_out[:4]}...")


def _name_batch_dim(proto, batch_axes: dict[str, int]) -> None:
    """Give the batch its own name (the exporter calls it after a shape symbol, e.g. `s45`) in every
    shape where that symbol appears, and check that it is really symbolic."""
    symbol = None
    for v in proto.graph.input:
        if v.name in batch_axes:
            dim = v.type.tensor_type.shape.dim[batch_axes[v.name]]
            if not dim.dim_param:
                raise RuntimeError(f"input {v.name}: batch dimension was exported as a constant {dim.dim_value}")
            if symbol not in (None, dim.dim_param):
                raise RuntimeError(f"batch inputs disagree on the batch symbol: {symbol} vs {dim.dim_param}")
            symbol = dim.dim_param
    for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in v.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH_DIM


def _strip_metadata(proto) -> None:
    """Drop the exporter's per-node debug metadata: stack traces hold absolute paths of this checkout
    (the fixture must not depend on where it was generated) and make up most of the file size."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del v.metadata_props[:]
        v.doc_string = ""
    del proto.metadata_props[:]
    proto.doc_string = ""


# ----------------------------------------------------------------------------------------------
# The model directory


def export_model(
    model: nn.Module,
    out_dir: Path,
    *,
    arch: str,
    num_classes: int,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    source: str,
) -> dict:
    """Write a complete classifier model directory; return figures (times, node counts)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = TrainStateLayout.of(model)
    t0 = time.perf_counter()
    initializers, forward_figures = export_forward(model, layout, image_size, out_dir)
    step_figures = export_train_step(model, layout, image_size, num_classes, out_dir / TRAIN_STEP_GRAPH)
    gemm_figures = export_train_step(model, layout, image_size, num_classes, out_dir / TRAIN_STEP_GEMM_GRAPH, gemm=True)
    state = train_state_of(model, layout)
    save_file({n: state[n] for n in layout.tensor_inputs}, str(out_dir / STATE_FILE))
    config = {
        "arch": arch,
        "num_classes": num_classes,
        "image_size": image_size,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "layout": "NCHW",
        "min_train_batch": MIN_TRAIN_BATCH,
        "bn_momentum": 0.1,
        "train_state": STATE_FILE,
        "params": layout.param_inputs,
        "momentum_buffers": layout.momentum_inputs,
        "states": layout.state_inputs,
        "scalars": list(SCALAR_INPUTS),
        "output_prefix": "new.",
        "weights_file": FORWARD_DATA,
        "weights_alignment": DATA_ALIGNMENT,
        "initializers": initializers,
    }
    write_manifest(
        out_dir,
        family="classifier",
        dtype="float32",
        source=source,
        graphs={"forward": FORWARD_GRAPH, **TRAIN_STEP_GRAPHS},
        config=config,
    )
    return {
        "total_s": time.perf_counter() - t0,
        "forward": forward_figures,
        "train_step": step_figures,
        "train_step_gemm": gemm_figures,
        "params": sum(state[n].numel() for n in layout.param_inputs),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, choices=ARCHS, help="torchvision architecture")
    parser.add_argument("--num-classes", type=int, required=True, help="size of the classification head")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--weights", type=Path, help="state_dict (.safetensors or torch.save) instead of a random init")
    parser.add_argument("--image-size", type=int, default=224, help="square input size baked into the graphs (default 224)")
    parser.add_argument("--mean", type=float, nargs=3, default=list(CLIP_MEAN), help="normalisation mean (default: CLIP's)")
    parser.add_argument("--std", type=float, nargs=3, default=list(CLIP_STD), help="normalisation std (default: CLIP's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init when --weights is absent")


def export(args: argparse.Namespace) -> None:
    model = build_model(args.arch, args.num_classes, args.seed)
    if args.weights:
        load_weights(model, args.weights)
        source = f"torchvision {args.arch} + {Path(args.weights).name}"
    else:
        source = f"torchvision {args.arch}, random init (seed {args.seed})"
    figures = export_model(
        model,
        args.out,
        arch=args.arch,
        num_classes=args.num_classes,
        image_size=args.image_size,
        mean=args.mean,
        std=args.std,
        source=source,
    )
    print(
        f"classifier {args.arch}: {figures['params']} params, forward {figures['forward']['nodes']} nodes, "
        f"train step {figures['train_step']['nodes']} nodes (GEMM form {figures['train_step_gemm']['nodes']}), "
        f"{figures['total_s']:.1f} s -> {args.out}"
    )


# ----------------------------------------------------------------------------------------------
# Eager torch references


def torch_sgd_steps(
    model: nn.Module,
    layout: TrainStateLayout,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    label_smoothing: float,
    train_mode: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Consecutive steps of torch.optim.SGD on `model` (modified in place), one per batch.

    Returns after each step the train state under the train-step output names (`new.param.*`,
    `new.momentum_buf.*`, `new.state.*`) and `loss`. `train_mode=False` runs the same step with BN in
    eval mode: the wrong graph the BN trap would export, for tests to tell the two apart.
    """
    model.train(train_mode)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    results = []
    for images, labels in batches:
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        out: dict[str, torch.Tensor] = {}
        for n in layout.params:
            out[f"new.param.{n}"] = params[n].detach().clone()
        for n in layout.params:
            out[f"new.momentum_buf.{n}"] = optimizer.state[params[n]]["momentum_buffer"].detach().clone()
        for n in layout.stats:
            out[f"new.state.{n}"] = buffers[n].detach().clone()
        out["loss"] = loss.detach().clone()
        results.append(out)
    return results


def reference_batch(seed: int, batch: int, image_size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch: normal images and uniform labels (torch.Generator, so Rust can reproduce it)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return images, labels


def _variant_name(nesterov: bool, label_smoothing: float) -> str:
    return f"nesterov{int(nesterov)}_ls{label_smoothing:g}"


def make_fixture(root: Path) -> None:
    """Export resnet-tiny to `root/resnet-tiny/` and write eager-torch references to
    `root/reference/classifier/` (index.json lists every case)."""
    from safetensors.torch import save_file

    root = Path(root)
    model_dir = root / FIXTURE_NAME
    ref_dir = root / "reference" / "classifier"
    for d in (model_dir, ref_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reduction order, hence the reference bits, must not depend on the machine
    try:
        model = build_model("resnet-tiny", FIXTURE_CLASSES, FIXTURE_SEED)
        layout = TrainStateLayout.of(model)
        export_model(
            model,
            model_dir,
            arch="resnet-tiny",
            num_classes=FIXTURE_CLASSES,
            image_size=FIXTURE_IMAGE_SIZE,
            source=f"torchvision ResNet skeleton + BasicBlock, widths {list(TINY_WIDTHS)}, random init (seed {FIXTURE_SEED})",
        )
        initial = train_state_of(model, layout)
        cases: list[dict[str, Any]] = []

        # (1) forward logits of the initial model.
        images, _ = reference_batch(100, FORWARD_REFERENCE_BATCH, FIXTURE_IMAGE_SIZE, FIXTURE_CLASSES)
        with torch.no_grad():
            logits = model.eval()(images)
        save_file({"images": images, "logits": logits}, str(ref_dir / "forward.safetensors"))
        cases.append(
            {
                "name": "forward",
                "kind": "forward",
                "file": "forward.safetensors",
                "weights": f"../../{FIXTURE_NAME}/{STATE_FILE}",
                "weights_prefix": "",
                "inputs": ["images"],
                "outputs": ["logits"],
            }
        )

        # (2) and (3): two consecutive SGD steps from the initial state, per variant.
        batches = [reference_batch(200 + i, b, FIXTURE_IMAGE_SIZE, FIXTURE_CLASSES) for i, b in enumerate(REFERENCE_BATCHES)]
        for i, (images, labels) in enumerate(batches, start=1):
            save_file({"images": images, "labels": labels}, str(ref_dir / f"batch{i}.safetensors"))
        trained_after_two = None
        for nesterov in (False, True):
            for label_smoothing in (0.0, 0.1):
                step_model = build_model("resnet-tiny", FIXTURE_CLASSES, FIXTURE_SEED)
                load_train_state(step_model, layout, initial)
                results = torch_sgd_steps(
                    step_model,
                    layout,
                    batches,
                    lr=REFERENCE_LR,
                    momentum=REFERENCE_MOMENTUM,
                    weight_decay=REFERENCE_WEIGHT_DECAY,
                    nesterov=nesterov,
                    label_smoothing=label_smoothing,
                )
                variant = _variant_name(nesterov, label_smoothing)
                for step, result in enumerate(results, start=1):
                    file = f"sgd_{variant}_step{step}.safetensors"
                    save_file(result, str(ref_dir / file))
                    cases.append(
                        {
                            "name": f"sgd_{variant}_step{step}",
                            "kind": "train_step",
                            "file": file,
                            "state_in": f"../../{FIXTURE_NAME}/{STATE_FILE}" if step == 1 else f"sgd_{variant}_step{step - 1}.safetensors",
                            "state_in_prefix": "" if step == 1 else "new.",
                            "batch": f"batch{step}.safetensors",
                            "scalars": {
                                "lr": REFERENCE_LR,
                                "momentum": REFERENCE_MOMENTUM,
                                "weight_decay": REFERENCE_WEIGHT_DECAY,
                                "nesterov": float(nesterov),
                                "label_smoothing": label_smoothing,
                            },
                        }
                    )
                if not nesterov and label_smoothing == 0.0:
                    trained_after_two = results[-1]

        # (5) ten chained steps (plain SGD variant): errors compounding over a run, as training
        # chains them. Only the final state and every step's loss are kept (size budget).
        ten_model = build_model("resnet-tiny", FIXTURE_CLASSES, FIXTURE_SEED)
        load_train_state(ten_model, layout, initial)
        sequence = [batches[i % len(batches)] for i in range(TEN_STEPS)]
        ten = torch_sgd_steps(
            ten_model,
            layout,
            sequence,
            lr=REFERENCE_LR,
            momentum=REFERENCE_MOMENTUM,
            weight_decay=REFERENCE_WEIGHT_DECAY,
            nesterov=False,
            label_smoothing=0.0,
        )
        final = {k: v for k, v in ten[-1].items() if k != "loss"}
        final["losses"] = torch.stack([r["loss"] for r in ten])
        ten_file = f"sgd_{_variant_name(False, 0.0)}_ten_steps.safetensors"
        save_file(final, str(ref_dir / ten_file))
        ten_case = {
            "name": f"sgd_{_variant_name(False, 0.0)}_ten_steps",
            "kind": "train_steps",
            "file": ten_file,
            "state_in": f"../../{FIXTURE_NAME}/{STATE_FILE}",
            "state_in_prefix": "",
            "batches": [f"batch{i % len(batches) + 1}.safetensors" for i in range(TEN_STEPS)],
            "scalars": {
                "lr": REFERENCE_LR,
                "momentum": REFERENCE_MOMENTUM,
                "weight_decay": REFERENCE_WEIGHT_DECAY,
                "nesterov": 0.0,
                "label_smoothing": 0.0,
            },
        }

        # (4) forward logits after two steps: the weights a trained copy of model.onnx.data carries.
        trained = build_model("resnet-tiny", FIXTURE_CLASSES, FIXTURE_SEED)
        load_train_state(trained, layout, trained_after_two, prefix="new.")
        images, _ = reference_batch(101, FORWARD_REFERENCE_BATCH, FIXTURE_IMAGE_SIZE, FIXTURE_CLASSES)
        with torch.no_grad():
            logits = trained.eval()(images)
        save_file({"images": images, "logits": logits}, str(ref_dir / "forward_trained.safetensors"))
        cases.append(
            {
                "name": "forward_trained",
                "kind": "forward",
                "file": "forward_trained.safetensors",
                "weights": f"sgd_{_variant_name(False, 0.0)}_step2.safetensors",
                "weights_prefix": "new.",
                "inputs": ["images"],
                "outputs": ["logits"],
            }
        )
        cases.append(ten_case)
    finally:
        torch.set_num_threads(threads)

    index = {
        "family": "classifier",
        "model": FIXTURE_NAME,
        "generator": "models/cip_export/classifier.py::make_fixture (eager torch / torchvision)",
        "notes": (
            "Paths are relative to this file. train_step cases: feed state_in (tensors named param.*, momentum_buf.*, state.*; after "
            "stripping state_in_prefix) with the batch's images/labels and the scalars to train_step.onnx; "
            "the file holds the expected new.* tensors and loss from torch.optim.SGD. Step 1 starts "
            "from zero momentum buffers; torch initialises its buffer to d_p there, which is the same. "
            "forward cases: logits of torchvision's eval-mode model with the given weights. "
            "train_steps cases: the batches in order, each step fed the previous step's outputs; the "
            "file holds the final new.* tensors and `losses` (one per step)."
        ),
        # Relative error, per tensor: max |actual - expected| / max |expected|. New params and
        # momentum buffers carry raw gradients, which fp32 reproduces only to ~1e-5.
        "tolerance": {"logits": 1e-5, "loss": 1e-5, "state": 1e-5, "param": 2e-5, "momentum_buf": 2e-5, "ten_steps": 1e-4},
        "cases": cases,
    }
    (ref_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
