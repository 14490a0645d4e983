"""What a trained model computes inside, drawn for `dlbase eval --report`: the first layer's filters (filters.png)
and, for a CNN, one digit's feature maps after each convolution layer (featuremaps.png)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dlbase.core.encoding import NoEncoding
from dlbase.core.model import CNN, MLP

MAX_FILTERS = 64  # panels in filters.png: every kernel of a usual first conv; the first 64 of an MLP's 512 rows
MAX_MAPS = 16  # channels per row of featuremaps.png
COLUMNS = 8  # panels per row of filters.png


def first_filters(model: nn.Module, input_shape: tuple[int, int]) -> Optional[tuple[torch.Tensor, str]]:
    """The first layer's weights as images (N, kh, kw), with the layer's name and weight shape:
    a CNN's first Conv2d (C_out, 1, k, k) gives its C_out kernels; an MLP whose first Linear sees the pixels one to
    one (no sinusoid encoding) gives its rows (h, H*W) as H x W images, each the pattern that unit responds to.
    None for an encoded MLP, whose first layer does not see pixels one to one."""
    if isinstance(model, CNN):
        conv = model.features[0]
        assert conv.in_channels == 1, "the CNN takes one grey channel"
        w = conv.weight.detach()  # (C_out, 1, k, k)
        return w[:, 0].float().cpu(), f"Conv2d weight {tuple(w.shape)}"
    if isinstance(model, MLP) and isinstance(model.encoding, NoEncoding):
        w = model.net[0].weight.detach()  # (h, H*W)
        return w.float().cpu().view(-1, *input_shape), f"Linear weight {tuple(w.shape)}, rows as {input_shape[0]}x" \
                                                       f"{input_shape[1]} images"
    return None


def conv_stages(model: CNN) -> list[tuple[int, int, str]]:
    """Each model.conv layer's modules in model.features as (start, stop, description): from its Conv2d up to the
    next one (norm, activation, pooling, dropout), described by the modules that act at eval (dropout does not)."""
    starts = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    stages = []
    for n, (a, b) in enumerate(zip(starts, starts[1:] + [len(model.features)])):
        names = []
        for m in model.features[a:b]:
            if isinstance(m, nn.Conv2d):
                names.append(f"Conv2d {m.kernel_size[0]}x{m.kernel_size[1]}"
                             + (f" stride {m.stride[0]}" if m.stride[0] > 1 else ""))
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                names.append(f"{type(m).__name__} {m.kernel_size}")
            elif not isinstance(m, nn.Dropout):
                names.append(type(m).__name__)
        stages.append((a, b, f"conv {n + 1}: " + " > ".join(names)))
    return stages


@torch.no_grad()
def feature_maps(model: CNN, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One image x (1, H*W) in [0, 1] through the model's convolutions in eval mode: per model.conv layer, its
    description and its output (C, h, w) after its activation and pooling, the input of the next layer."""
    was_training = model.training
    model.eval()
    image = model.encoding(x.float()).view(1, 1, *model.input_shape)  # as CNN.forward: (1, 1, H, W), standardised
    maps = []
    for a, b, what in conv_stages(model):
        image = model.features[a:b](image)  # (1, C, h, w)
        maps.append((what, image[0].float().cpu()))
    model.train(was_training)
    return maps


def filters_figure(plt, weights: torch.Tensor, what: str, title: str):
    """filters.png's figure: one panel per filter (the first MAX_FILTERS), one diverging scale centred at 0."""
    shown = weights[:MAX_FILTERS]
    cols = min(COLUMNS, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3 + 1.2, rows * 1.35 + 1.0), constrained_layout=True,
                             squeeze=False)
    m = float(shown.abs().max()) or 1.0  # symmetric limits: white is 0, red > 0, blue < 0
    im = None
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(shown):
            im = ax.imshow(shown[k].numpy(), cmap="RdBu_r", vmin=-m, vmax=m)
            ax.set_title(str(k), fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
    part = f"the first {len(shown)} of {len(weights)}" if len(shown) < len(weights) else f"all {len(weights)}"
    fig.suptitle(f"{title}\nfirst layer's filters: {what}; {part}, one panel per output unit", fontsize=10)
    return fig


def featuremaps_figure(plt, image: torch.Tensor, maps: list[tuple[str, torch.Tensor]], title: str):
    """featuremaps.png's figure: the digit, then a row per convolution layer of its first MAX_MAPS channels,
    one colour scale per row (the layer's own range over the channels shown)."""
    cols = max(2, min(MAX_MAPS, max(m.shape[0] for _, m in maps)))
    fig = plt.figure(figsize=(cols * 1.05 + 0.4, (1 + len(maps)) * 1.55 + 0.6), layout="constrained")
    subfigs = fig.subfigures(1 + len(maps), 1)
    ax = subfigs[0].subplots(1, cols, squeeze=False)[0]
    for a in ax:
        a.axis("off")
    ax[0].imshow(image.numpy(), cmap="gray_r")
    subfigs[0].suptitle("the input image", fontsize=8)
    for sub, (what, m) in zip(subfigs[1:], maps):
        shown = m[:cols]
        lo, hi = float(shown.min()), float(shown.max())
        row = sub.subplots(1, cols, squeeze=False)[0]
        for c, a in enumerate(row):
            a.axis("off")
            if c < len(shown):
                a.imshow(shown[c].numpy(), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1)
                a.set_title(f"ch {c}", fontsize=7)
        sub.suptitle(f"{what}: {tuple(m.shape)} (channels, height, width); {len(shown)} of {m.shape[0]} channels "
                     f"shown, colour from {lo:.3g} to {hi:.3g}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def inside_figures(plt, model: nn.Module, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor,
                   input_shape: tuple[int, int], title: str) -> dict[str, object]:
    """{file name: figure}: filters.png where first_filters has some, featuremaps.png for a CNN (the split's first
    image, x[0], with its true label y[0] and prediction pred[0])."""
    figures = {}
    filters = first_filters(model, input_shape)
    if filters is not None:
        figures["filters.png"] = filters_figure(plt, *filters, title)
    if isinstance(model, CNN) and len(x):
        digit = (f"{title}: the split's first image (index 0, true {int(y[0])}, predicted {int(pred[0])}) through "
                 f"the convolutions;\neach row is a layer's output after its activation and pooling (at eval: no "
                 f"dropout), its first {MAX_MAPS} channels at most")
        figures["featuremaps.png"] = featuremaps_figure(plt, x[0].float().cpu().view(*input_shape),
                                                        feature_maps(model, x[:1]), digit)
    return figures
