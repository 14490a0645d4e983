"""The hand-written delta rule for convolution, pooling and batch norm (core/convprop.py) against autograd in float64:
layer by layer over several shapes, as a small chain ending in cross-entropy, and over feature stacks read from an
nn.Sequential of torch's own modules."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlbase.core import backprop
from dlbase.core import convprop as cp
from dlbase.core.model import ACTIVATIONS as ACTIVATION_MODULES

TOL = 1e-10  # relative: max |manual - autograd| / max |autograd|
D = torch.float64


def rel(manual: torch.Tensor, auto: torch.Tensor) -> float:
    return ((manual - auto).abs().max() / auto.abs().max().clamp_min(1e-300)).item()


def randn(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D).requires_grad_(grad)


# (B, C_in, H, W, C_out, kernel, stride, padding): kernels 1/3/5, strides 1/2, padding 0/1/2, non-square maps,
# batches of 1 and 3, one non-square kernel; several leave input rows that no window reaches
CONV_CASES = [
    (1, 1, 8, 8, 2, 1, 1, 0),
    (3, 2, 7, 9, 4, 3, 1, 1),
    (3, 3, 9, 6, 2, 3, 2, 0),
    (1, 2, 10, 7, 3, 5, 1, 2),
    (3, 2, 11, 8, 3, 5, 2, 2),
    (3, 1, 6, 10, 2, 3, 2, 1),
    (1, 3, 5, 5, 2, 1, 2, 1),
    (3, 2, 8, 7, 2, (3, 1), (2, 1), (1, 0)),
    (3, 2, 6, 6, 3, 5, 1, 0),
]


def conv_errors(case, bias=True, seed=0):
    B, C_in, H, W, C_out, k, s, p = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x, w = randn(B, C_in, H, W, seed=seed, grad=True), randn(C_out, C_in, kh, kw, seed=seed + 1, grad=True)
    b = randn(C_out, seed=seed + 2, grad=True) if bias else None
    out, cache = cp.conv2d_forward(x, w, b, s, p)
    ref = F.conv2d(x, w, b, s, p)
    delta = randn(*ref.shape, seed=seed + 3)
    auto = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), delta)
    dx, dw, db = cp.conv2d_backward(delta, w.detach(), cache)
    errors = {"forward": rel(out, ref), "dx": rel(dx, auto[0]), "dW": rel(dw, auto[1])}
    if bias:
        errors["db"] = rel(db, auto[2])
    return errors


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_and_backward_equal_autograd(case, bias):
    errors = conv_errors(case, bias)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_delta_is_the_full_correlation_with_the_flipped_kernel(case):
    """The module docstring's claim: dL/dx is delta (with stride - 1 zeros between its entries) correlated in full
    with the kernel flipped in both directions, in and out channels swapped, then cut to the unpadded input."""
    B, C_in, H, W, C_out, k, s, p = case
    (kh, kw), (sh, sw), (ph, pw) = [(v, v) if isinstance(v, int) else v for v in (k, s, p)]
    x, w = randn(B, C_in, H, W), randn(C_out, C_in, kh, kw, seed=1)
    out, cache = cp.conv2d_forward(x, w, None, s, p)
    delta = randn(*out.shape, seed=2)
    dx, _, _ = cp.conv2d_backward(delta, w, cache)
    Ho, Wo = out.shape[2:]
    spread = delta.new_zeros(B, C_out, (Ho - 1) * sh + 1, (Wo - 1) * sw + 1)
    spread[:, :, ::sh, ::sw] = delta  # stride - 1 zeros between the entries
    full = F.conv2d(F.pad(spread, (kw - 1, kw - 1, kh - 1, kh - 1)), w.flip(2, 3).transpose(0, 1))
    full = F.pad(full, (0, W + 2 * pw - full.shape[3], 0, H + 2 * ph - full.shape[2]))  # rows no window reached
    assert rel(dx, full[:, :, ph:ph + H, pw:pw + W]) < TOL


POOL_CASES = [(1, 1, 4, 4, 2), (3, 2, 7, 9, 2), (3, 3, 9, 6, 3), (1, 2, 5, 11, 5), (3, 2, 6, 5, 1)]  # B, C, H, W, k


def pool_errors(kind, case, seed=0):
    B, C, H, W, k = case
    x = randn(B, C, H, W, seed=seed, grad=True)  # random floats: no ties
    fwd, bwd, ref_fn = {"max": (cp.maxpool2d_forward, cp.maxpool2d_backward, F.max_pool2d),
                        "avg": (cp.avgpool2d_forward, cp.avgpool2d_backward, F.avg_pool2d)}[kind]
    out, cache = fwd(x, k)
    ref = ref_fn(x, k)
    delta = randn(*ref.shape, seed=seed + 1)
    (auto,) = torch.autograd.grad(ref, [x], delta)
    return {"forward": rel(out, ref), "dx": rel(bwd(delta, cache), auto)}


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pooling_forward_and_backward_equal_autograd(kind, case):
    errors = pool_errors(kind, case)
    assert max(errors.values()) < TOL, errors


def test_max_pooling_ties_go_to_the_first_max_in_the_window_as_torch_does():
    """On a tie torch's max_pool2d backward gives the whole delta to the first maximal entry in row-major order
    within the window (its index); ours takes argmax's first maximal entry, the same one."""
    x = torch.zeros(2, 2, 5, 6, dtype=D, requires_grad=True)  # every window a tie
    out, cache = cp.maxpool2d_forward(x, 2)
    delta = randn(*out.shape)
    (auto,) = torch.autograd.grad(F.max_pool2d(x, 2), [x], delta)
    first = torch.zeros_like(auto)
    first[:, :, 0:4:2, 0:6:2] = delta  # each window's top-left entry
    assert torch.equal(auto, first) and torch.equal(cp.maxpool2d_backward(delta, cache), auto)
    xi = torch.randint(0, 3, (3, 2, 8, 6), generator=torch.Generator().manual_seed(1)).to(D).requires_grad_()
    out, cache = cp.maxpool2d_forward(xi, 2)  # a few values only: ties in most windows, in various places
    (auto,) = torch.autograd.grad(F.max_pool2d(xi, 2), [xi], delta := randn(*out.shape, seed=2))
    assert torch.equal(cp.maxpool2d_backward(delta, cache), auto)


def test_pooling_refuses_a_window_larger_than_the_map():
    with pytest.raises(ValueError, match="no window"):
        cp.maxpool2d_forward(torch.zeros(1, 1, 3, 5), 4)


BN_CASES = [(3, 2, 5, 7), (1, 3, 4, 4), (3, 4, 1, 1), (3, 2, 6, 3)]  # B, C, H, W


def bn_errors(case, affine=True, train=True, seed=0):
    B, C, H, W = case
    x = (randn(B, C, H, W, seed=seed) * 2 + 0.5).requires_grad_()
    g, b = (randn(C, seed=seed + 1, grad=True), randn(C, seed=seed + 2, grad=True)) if affine else (None, None)
    rm, rv = randn(C, seed=seed + 3), randn(C, seed=seed + 4).abs() + 0.5
    out, cache = cp.batchnorm2d_forward(x, g, b, 1e-5, rm, rv, train)
    ref = F.batch_norm(x, rm.clone(), rv.clone(), g, b, train, 0.1, 1e-5)
    delta = randn(*ref.shape, seed=seed + 5)
    auto = torch.autograd.grad(ref, [x] + ([g, b] if affine else []), delta)
    dx, dg, db = cp.batchnorm2d_backward(delta, None if g is None else g.detach(), cache)
    errors = {"forward": rel(out, ref), "dx": rel(dx, auto[0])}
    if affine:
        errors.update(dgamma=rel(dg, auto[1]), dbeta=rel(db, auto[2]))
    return errors


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("case", BN_CASES)
def test_batchnorm2d_forward_and_backward_equal_autograd(case, affine, train):
    errors = bn_errors(case, affine, train)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_move_as_torch_moves_them(momentum):
    torch.manual_seed(0)
    ours = nn.BatchNorm2d(3, momentum=momentum).double()
    theirs = nn.BatchNorm2d(3, momentum=momentum).double()
    steps = [("batchnorm2d", ours)]
    for seed in range(3):
        x = randn(4, 3, 5, 6, seed=seed) * (seed + 1) + seed
        cp.update_running_stats(steps, cp.cnn_forward(steps, x))
        theirs(x)
    for name in ("running_mean", "running_var"):
        assert rel(getattr(ours, name), getattr(theirs, name)) < TOL
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3


CHAINS = [  # (B, H, W, conv1 (kernel, stride, padding), conv2 (kernel, stride, padding))
    (3, 10, 9, (3, 1, 1), (3, 1, 0)),
    (1, 13, 11, (5, 2, 2), (1, 1, 1)),
    (3, 12, 14, (1, 1, 0), (3, 2, 2)),
]


def chain_errors(chain, seed=0):
    """conv -> relu -> maxpool -> conv -> avgpool -> flatten -> linear -> cross-entropy, by hand and by autograd."""
    B, H, W, (k1, s1, p1), (k2, s2, p2) = chain
    x = randn(B, 1, H, W, seed=seed)
    y = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(seed))
    w1, b1 = randn(4, 1, k1, k1, seed=seed + 1, grad=True), randn(4, seed=seed + 2, grad=True)
    w2, b2 = randn(5, 4, k2, k2, seed=seed + 3, grad=True), randn(5, seed=seed + 4, grad=True)
    ref = F.avg_pool2d(F.conv2d(F.max_pool2d(F.relu(F.conv2d(x, w1, b1, s1, p1)), 2), w2, b2, s2, p2), 2).flatten(1)
    w3, b3 = randn(10, ref.shape[1], seed=seed + 5, grad=True), randn(10, seed=seed + 6, grad=True)
    params = [w1, b1, w2, b2, w3, b3]
    auto = torch.autograd.grad(F.cross_entropy(ref @ w3.T + b3, y), params)
    with torch.no_grad():
        z1, c1 = cp.conv2d_forward(x, w1, b1, s1, p1)
        a2, c2 = cp.maxpool2d_forward(backprop.ACTIVATIONS["relu"][0](z1), 2)
        z3, c3 = cp.conv2d_forward(a2, w2, b2, s2, p2)
        a4, c4 = cp.avgpool2d_forward(z3, 2)
        flat = a4.flatten(1)  # (B, 5 * h * w)
        delta = backprop.output_delta(flat @ w3.T + b3, y, "cross_entropy", "softmax")  # (B, 10)
        dw3, db3 = delta.T @ flat, delta.sum(0)
        delta = (delta @ w3).reshape(a4.shape)  # the Linear's delta rule, then un-flatten
        delta, dw2, db2 = cp.conv2d_backward(cp.avgpool2d_backward(delta, c4), w2, c3)
        delta = cp.maxpool2d_backward(delta, c2) * backprop.ACTIVATIONS["relu"][1](z1)
        _, dw1, db1 = cp.conv2d_backward(delta, w1, c1)
    names = ["dW1", "db1", "dW2", "db2", "dW3", "db3"]
    return {n: rel(m, a) for n, m, a in zip(names, [dw1, db1, dw2, db2, dw3, db3], auto)}


@pytest.mark.parametrize("chain", CHAINS)
def test_a_small_chain_to_cross_entropy_equals_autograd(chain):
    errors = chain_errors(chain)
    assert max(errors.values()) < TOL, errors


def features(activation="relu", dropout=0.0):
    """A hand-built stack of torch's own modules, as the CNN model's `features` would be, and a Linear head."""
    act = ACTIVATION_MODULES[activation]
    layers = [nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), act(), nn.MaxPool2d(2),
              nn.Conv2d(4, 6, 5, stride=2, padding=2), act(), nn.AvgPool2d(2),
              nn.Conv2d(6, 3, 1, bias=False), nn.BatchNorm2d(3, affine=False), act()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Flatten()).double(), nn.Linear(3 * 2 * 2, 10).double()


def stack_errors(activation, train=True, dropout=0.0, seed=0):
    """Every parameter's gradient, and the input's, from cnn_backward (plus the head's delta rule) against
    autograd: through torch's modules themselves without dropout, through the written-out forward with it."""
    torch.manual_seed(seed)
    seq, head = features(activation, dropout)
    seq.train(train)
    x, y = randn(3, 2, 17, 15, seed=seed, grad=True), torch.randint(0, 10, (3,))
    steps = cp.steps_of(seq)
    cache = cp.cnn_forward(steps, x.detach(), train, generator=torch.Generator().manual_seed(seed))
    params = list(seq.parameters())
    with torch.no_grad():
        ref = seq(x) if not dropout else None
    errors = {"forward": rel(cache.out, ref)} if ref is not None else {}
    out = seq(x) if not dropout else cp.cnn_forward(steps, x, train, masks=cache.masks).out
    auto = torch.autograd.grad(F.cross_entropy(head(out), y), [x, *params, head.weight])
    with torch.no_grad():
        delta = backprop.output_delta(head(cache.out), y, "cross_entropy", "softmax")  # (B, 10)
        dhead = delta.T @ cache.out
        dx, grads = cp.cnn_backward(steps, cache, delta @ head.weight)
    assert [p for p, _ in grads] == params  # in parameters() order
    errors.update({f"{i}:{tuple(p.shape)}": rel(g, a) for i, ((p, g), a) in enumerate(zip(grads, auto[1:-1]))})
    errors.update(dx=rel(dx, auto[0]), head=rel(dhead, auto[-1]))
    return errors


@pytest.mark.parametrize("activation", backprop.ACTIVATIONS)
def test_a_feature_stack_of_torch_modules_equals_autograd(activation):
    errors = stack_errors(activation)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_feature_stack_in_eval_mode_equals_autograd(activation):
    errors = stack_errors(activation, train=False)
    assert max(errors.values()) < TOL, errors


def test_a_feature_stack_with_dropout_equals_autograd_on_the_same_masks():
    errors = stack_errors("sigmoid", dropout=0.3)
    assert max(errors.values()) < TOL, errors


def test_dropout_masks_are_inverted_and_drawn_from_the_generator():
    steps = [("dropout", 0.25)]
    x = torch.ones(4, 3, 10, 10, dtype=D)
    a = cp.cnn_forward(steps, x, generator=torch.Generator().manual_seed(5))
    b = cp.cnn_forward(steps, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.masks[0], b.masks[0]) and torch.equal(a.out, a.masks[0])
    assert set(a.masks[0].unique().tolist()) == {0.0, 1 / 0.75}
    assert 0.15 < (a.masks[0] == 0).to(D).mean().item() < 0.35
    assert cp.cnn_forward(steps, x, train=False).masks == [None]  # eval: no dropout


def test_steps_of_reads_a_sequential():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(), nn.MaxPool2d(2), nn.Identity(),
                        nn.Conv2d(4, 2, 3), nn.GELU(), nn.AvgPool2d(3), nn.Dropout(0.2), nn.Flatten())
    assert cp.steps_of(seq) == [("conv", seq[0]), ("batchnorm2d", seq[1]), ("act", "leaky_relu"), ("maxpool", 2),
                                ("conv", seq[5]), ("act", "gelu"), ("avgpool", 3), ("dropout", 0.2), ("flatten",)]


@pytest.mark.parametrize("module,says", [
    (nn.Conv2d(2, 4, 3, groups=2), "groups=1"),
    (nn.Conv2d(2, 4, 3, dilation=2), "dilation=1"),
    (nn.Conv2d(2, 4, 3, padding="same"), "numeric padding"),
    (nn.MaxPool2d(3, stride=1), "kernel = stride"),
    (nn.MaxPool2d(2, ceil_mode=True), "floor mode"),
    (nn.AvgPool2d(2, padding=1), "no padding"),
    (nn.LeakyReLU(0.2), "negative_slope=0.01"),
    (nn.GELU(approximate="tanh"), "approximate='none'"),
    (nn.Dropout2d(0.1), "not a module the hand-written rule knows"),
    (nn.LayerNorm(4), "not a module the hand-written rule knows"),
])
def test_steps_of_refuses_what_the_rule_does_not_cover(module, says):
    with pytest.raises(ValueError, match=r"features\[1\]") as e:
        cp.steps_of(nn.Sequential(nn.Identity(), module))
    assert says in str(e.value)


def test_the_activation_table_is_backprops_and_a_planted_error_is_caught(monkeypatch):
    f, _ = backprop.ACTIVATIONS["tanh"]
    monkeypatch.setitem(backprop.ACTIVATIONS, "tanh", (f, lambda z: 1 - torch.tanh(z)))  # forgot the square
    errors = stack_errors("tanh")
    assert errors["forward"] < TOL and errors["head"] < TOL  # neither uses f'
    assert errors["dx"] > 1e-3
