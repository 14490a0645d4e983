"""dlbase/core/augment.py against oracles: translations against torch.roll with zero fill, affine transforms
against torch.rot90 and torchvision's affine, elastic distortions against torchvision's elastic with the same
field, the composition against its stages on linear images (where bilinear sampling is exact), and the draws'
determinism, including a resumed generator and, on a GPU, a CUDA graph replaying draws from a generator."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dlbase.core.augment import (AugmentConfig, Draws, affine, apply, augment, draw, elastic, elastic_displacement,
                                 translate)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# float32 grid coordinates (2i+1)/W - 1 are rounded, so even the identity grid samples up to ~W * 2^-24 pixels
# off each pixel centre; bilinear sampling moves a value by that much times its step to a neighbour (<= 1 here)
F32_GRID = 28 * 2.0 ** -24 * 4  # 4 such roundings: ~7e-6
FIELD_F32 = 34.0 * 1e-6  # float32 elastic fields of alpha 34 px, summed in another order (see the field's test)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def twin(g: torch.Generator) -> torch.Generator:
    """A second generator in g's state: it draws what g will draw next."""
    t = torch.Generator(device=g.device)
    t.set_state(g.get_state())
    return t


def digits(n: int, shape=(28, 28), seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Random images in [0, 1], (n, H, W)."""
    return torch.rand(n, *shape, generator=gen(seed), dtype=dtype)


def centred(shape=(28, 28), dtype=torch.float32) -> torch.Tensor:
    """(1, H, W): an asymmetric blob and bar that stay clear of the border under any 90-degree turn."""
    h, w = shape
    y, x = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    img = torch.exp(-((x - 11) ** 2 + (y - 12) ** 2) / 8) + 0.5 * ((x >= 14) & (x <= 18) & (y >= 9) & (y <= 19))
    return img[None]


def ramp(n: int, shape=(28, 28), cx: float = 0.3, cy: float = 0.7, dtype=torch.float64) -> torch.Tensor:
    """(n, H, W) linear images cx * j + cy * i + 1: bilinear sampling inside the image is exact on them."""
    h, w = shape
    y, x = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return (cx * x + cy * y + 1).expand(n, h, w).clone()


def interior(shape, margin: int) -> torch.Tensor:
    h, w = shape
    m = torch.zeros(h, w, dtype=torch.bool)
    m[margin:h - margin, margin:w - margin] = True
    return m


# ---------------------------------------------------------------------------------------------- translate
def rolled(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The oracle: torch.roll, then zero what wrapped round."""
    out = torch.roll(img, shifts=(dy, dx), dims=(-2, -1)).clone()
    if dy > 0:
        out[..., :dy, :] = 0
    elif dy < 0:
        out[..., dy:, :] = 0
    if dx > 0:
        out[..., :, :dx] = 0
    elif dx < 0:
        out[..., :, dx:] = 0
    return out


@pytest.mark.parametrize("shape", [(28, 28), (20, 24)])
def test_translate_equals_roll_with_zero_fill_per_image(shape):
    m, x, g = 3, digits(64, shape), gen(5)
    shifts = torch.randint(-m, m + 1, (64, 2), generator=twin(g))  # the draw the contract names
    out = translate(x, g, m, shape)
    assert set(shifts.flatten().tolist()) == set(range(-m, m + 1))  # every shift, both signs, occurs
    for b in range(64):
        assert torch.equal(out[b], rolled(x[b], int(shifts[b, 0]), int(shifts[b, 1]))), b


def test_translate_takes_flat_batches_and_keeps_their_dtype():
    x = digits(8)
    flat = translate(x.reshape(8, 784), gen(2), 2)
    assert flat.shape == (8, 784) and torch.equal(flat.view(8, 28, 28), translate(x, gen(2), 2))
    b16 = translate(x.to(torch.bfloat16).reshape(8, 784), gen(2), 2)
    assert b16.dtype == torch.bfloat16 and torch.equal(b16, flat.to(torch.bfloat16))  # shifts copy, no rounding


# ------------------------------------------------------------------------------------------------- affine
def test_affine_with_zero_ranges_is_the_identity():
    x64 = digits(16, dtype=torch.float64)
    assert torch.allclose(affine(x64, gen(), 0, (1, 1), 0, 0), x64, rtol=0, atol=1e-12)
    x32 = x64.float()
    assert (affine(x32, gen(), 0, (1, 1), 0, 0) - x32).abs().max() <= F32_GRID


def params(angle=0.0, scale=1.0, shear=0.0, tx=0.0, ty=0.0) -> torch.Tensor:
    return torch.tensor([[angle, scale, shear, tx, ty]])


@pytest.mark.parametrize("angle,k", [(90.0, -1), (-90.0, 1), (180.0, 2)])
def test_a_quarter_turn_equals_rot90(angle, k):
    """Positive angles turn clockwise, as torchvision's affine; a 28x28 grid maps onto itself under quarter turns."""
    img = centred()
    out = apply(img, Draws(affine=params(angle)), AugmentConfig())
    assert torch.allclose(out, torch.rot90(img, k=k, dims=(-2, -1)), rtol=0, atol=1e-5)


TV_CASES = [dict(angle=17.0, scale=1.1, shear=8.0, tx=1.5, ty=-2.25), dict(angle=-33.0, scale=0.85, shear=-12.0),
            dict(angle=5.0, tx=-3.0, ty=0.5), dict(scale=1.2, shear=20.0)]


@pytest.mark.parametrize("shape", [(28, 28), (20, 24)])
@pytest.mark.parametrize("case", TV_CASES)
def test_affine_matches_torchvision(case, shape):
    """The same sampling points as torchvision's affine (bilinear, no fill: zeros). Both build float32 grids by
    other routes (its own linspace and bmm in centred pixels, ours affine_grid in [-1, 1] units), so the points
    differ by float32 rounding (a few 2^-24 of W pixels), which moves a value in [0, 1] by at most as much."""
    x = digits(4, shape)
    p = params(**case)
    ours = apply(x, Draws(affine=p.expand(4, 5)), AugmentConfig(), shape)
    theirs = TF.affine(x[:, None], angle=case.get("angle", 0.0), translate=[case.get("tx", 0.0), case.get("ty", 0.0)],
                       scale=case.get("scale", 1.0), shear=[case.get("shear", 0.0), 0.0],
                       interpolation=InterpolationMode.BILINEAR)[:, 0]
    assert (ours - theirs).abs().max() <= F32_GRID


def test_affine_draws_per_image_as_its_contract_says():
    """affine() = one rand(B, 5) mapped onto the ranges, each image through torchvision with its own parameters."""
    x, g = digits(6), gen(9)
    u = torch.rand(6, 5, generator=twin(g))
    out = affine(x, g, degrees=15, scale=(0.9, 1.1), shear=10, translate=0.1)
    for b in range(6):
        angle, scale, shear = (2 * u[b, 0] - 1) * 15, 0.9 + u[b, 1] * 0.2, (2 * u[b, 2] - 1) * 10
        tx, ty = (2 * u[b, 3] - 1) * 2.8, (2 * u[b, 4] - 1) * 2.8
        theirs = TF.affine(x[b:b + 1, None], angle=float(angle), translate=[float(tx), float(ty)],
                           scale=float(scale), shear=[float(shear), 0.0], interpolation=InterpolationMode.BILINEAR)
        assert (out[b] - theirs[0, 0]).abs().max() <= F32_GRID, b


# ------------------------------------------------------------------------------------------------ elastic
def tv_displacement(noise: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """torchvision ElasticTransform's own field for this noise (its make_params with the draw replaced):
    gaussian_blur with int(8 sigma + 1) taps made odd, times alpha_tv / W (dx) and / H (dy), alpha_tv = 2 alpha;
    (n, H, W, 2) in [-1, 1] units."""
    h, w = noise.shape[-2:]
    k = int(8 * sigma + 1) | 1
    smooth = TF.gaussian_blur(noise, [k, k], [sigma, sigma])
    return torch.stack([smooth[:, 0] * (2 * alpha) / w, smooth[:, 1] * (2 * alpha) / h], dim=-1)


def test_the_field_is_torchvisions_gaussian_blur_times_alpha():
    """The same formula: equal to 1e-12 in float64. In float32 the two sums of the taps (ours two 1-D passes,
    torchvision's one 2-D kernel) round differently, a few ulps of the field: 1e-6 of alpha pixels."""
    noise = torch.rand(3, 2, 28, 28, generator=gen(3), dtype=torch.float64) * 2 - 1
    for sigma in (2.0, 4.0, 5.0):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, FIELD_F32)):
            ours = elastic_displacement(noise.to(dtype), 34.0, sigma)  # pixels
            theirs = tv_displacement(noise.to(dtype), 34.0, sigma) * 14  # [-1, 1] units * W/2 = pixels
            assert (ours - theirs).abs().max() <= tol, (sigma, dtype)


def test_elastic_matches_torchvisions_elastic():
    x, g, alpha, sigma = digits(5), gen(4), 34.0, 4.0
    noise = torch.rand(5, 2, 28, 28, generator=twin(g)) * 2 - 1  # the draw the contract names
    out = elastic(x, g, alpha, sigma)
    disp = tv_displacement(noise, alpha, sigma)
    for b in range(5):
        theirs = TF.elastic(x[b:b + 1, None], disp[b:b + 1], interpolation=InterpolationMode.BILINEAR)
        # the fields agree to FIELD_F32 px (above); a value moves by at most that much times its step (<= 1),
        # plus the float32 rounding of the grid itself
        assert (out[b] - theirs[0, 0]).abs().max() <= FIELD_F32 + F32_GRID, b


def test_elastic_with_alpha_zero_is_the_identity():
    x64 = digits(8, dtype=torch.float64)
    assert torch.allclose(elastic(x64, gen(), 0.0, 4.0), x64, rtol=0, atol=1e-12)
    x32 = x64.float()
    assert (elastic(x32, gen(), 0.0, 4.0) - x32).abs().max() <= F32_GRID


def test_a_ramp_moves_by_the_field_and_the_field_scales_with_alpha():
    """On x(i, j) = j the output is j + dx(i, j) wherever the sample stays inside (bilinear is exact on a linear
    image), so the image itself shows the field: in pixels, of the size alpha gives, pointing where we sample."""
    sigma, state = 4.0, gen(7).get_state()
    moved = {}
    for alpha in (3.0, 6.0):
        g = gen()
        g.set_state(state)
        noise = torch.rand(16, 2, 28, 28, generator=twin(g)) * 2 - 1
        d = elastic_displacement(noise.double(), alpha, sigma)  # (16, 28, 28, 2) pixels
        out_x = elastic(ramp(16, cx=1.0, cy=0.0), twin(g), alpha, sigma) - ramp(16, cx=1.0, cy=0.0)
        out_y = elastic(ramp(16, cx=0.0, cy=1.0), g, alpha, sigma) - ramp(16, cx=0.0, cy=1.0)
        inside = interior((28, 28), 4)
        assert d.abs().max() < 4  # so every interior sample is inside
        assert torch.allclose(out_x[:, inside], d[..., 0][:, inside], atol=1e-5)  # float32 noise, float64 warp
        assert torch.allclose(out_y[:, inside], d[..., 1][:, inside], atol=1e-5)
        moved[alpha] = torch.stack([out_x, out_y], -1)[:, inside].norm(dim=-1).mean().item()
    # each component of the field is alpha * sum of k_i k_j u_ij, u uniform in [-1, 1] (variance 1/3): its std is
    # alpha * sqrt(sum(k^2)^2 / 3), and the mean length of two such independent normal components is that times
    # sqrt(pi / 2) (Rayleigh); sum(k^2) ~ 1 / (2 sigma sqrt(pi)). Smoothing leaves few independent samples: 25%.
    k2 = 1 / (2 * sigma * math.sqrt(math.pi))
    assert moved[3.0] == pytest.approx(3.0 * math.sqrt(k2 ** 2 / 3) * math.sqrt(math.pi / 2), rel=0.25)
    assert moved[6.0] / moved[3.0] == pytest.approx(2.0, rel=1e-4)


# ------------------------------------------------------------------------------------------------ augment
STAGES = {"translate": (AugmentConfig(translate=2), lambda x, g: translate(x, g, 2)),
          "affine": (AugmentConfig(degrees=10, scale=(0.9, 1.1), shear=5),
                     lambda x, g: affine(x, g, 10, (0.9, 1.1), 5, 0.0)),
          "elastic": (AugmentConfig(elastic_alpha=34, elastic_sigma=4), lambda x, g: elastic(x, g, 34, 4))}


@pytest.mark.parametrize("stage", STAGES)
def test_augment_with_one_stage_is_that_stage(stage):
    spec, fn = STAGES[stage]
    x, g = digits(8).reshape(8, 784), gen(11)
    g2 = twin(g)
    assert torch.equal(augment(x, g, spec), fn(x, g2))
    assert torch.equal(g.get_state(), g2.get_state())  # and draws as much


def test_augment_is_elastic_of_affine_then_translate():
    """On linear images two interpolations equal one, so the one-resampling composition must equal the stages
    applied one after another (same draws, same order) wherever no sample left the image."""
    spec = AugmentConfig(translate=2, degrees=8, scale=(0.95, 1.05), shear=5, elastic_alpha=3, elastic_sigma=4)
    x, g = ramp(12), gen(13)
    g2 = twin(g)
    stages = translate(elastic(affine(x, g2, 8, (0.95, 1.05), 5, 0.0), g2, 3, 4), g2, 2)
    inside = interior((28, 28), 8)
    assert torch.allclose(augment(x, g, spec)[:, inside], stages[:, inside], rtol=0, atol=1e-9)
    assert not torch.allclose(stages[:, inside], x[:, inside])


def test_augment_off_returns_the_batch_and_draws_nothing():
    x, g = digits(4), gen(1)
    state = g.get_state()
    assert augment(x, g, AugmentConfig()) is x and torch.equal(g.get_state(), state)
    assert not AugmentConfig().enabled and AugmentConfig(translate=1).enabled and AugmentConfig(scale=(0.9, 1.0)).enabled
    assert AugmentConfig(elastic_sigma=6).enabled is False  # sigma alone does nothing


@pytest.mark.parametrize("bad", [dict(translate=-1), dict(translate=1.5), dict(degrees=-3),
                                 dict(scale=(0, 1)), dict(shear=90), dict(elastic_alpha=-1)])
def test_a_bad_spec_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AugmentConfig(**bad)


def test_wrong_shapes_and_devices_are_refused():
    with pytest.raises(ValueError, match="neither"):
        augment(torch.zeros(4, 100), gen(), AugmentConfig(translate=1))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            augment(torch.zeros(4, 784), gen(device="cuda"), AugmentConfig(translate=1))


# ------------------------------------------------------------------------------------------- determinism
FULL = AugmentConfig(translate=2, degrees=10, scale=(0.9, 1.1), shear=5, elastic_alpha=34, elastic_sigma=4)


def run_steps(x, g, steps):
    return [augment(x, g, FULL) for _ in range(steps)]


def test_the_same_state_draws_the_same_and_a_resumed_generator_goes_on():
    x = digits(16).reshape(16, 784)
    uninterrupted = run_steps(x, gen(21), 5)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, run_steps(x, gen(21), 5)))
    assert not torch.equal(uninterrupted[0], run_steps(x, gen(22), 1)[0])
    assert not torch.equal(uninterrupted[0], uninterrupted[1])  # each step draws anew
    g = gen(21)
    run_steps(x, g, 2)
    saved = g.get_state()  # a checkpoint after step 2, restored into a new process's generator
    resumed = gen(999)
    resumed.set_state(saved)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[2:], run_steps(x, resumed, 3)))


def test_a_population_draws_per_member_and_applies_at_once():
    """K members, each with its own generator: one apply over (K*B) equals each member's own augment."""
    x = digits(3 * 8).reshape(3, 8, 784)
    gens = [gen(s) for s in (1, 2, 3)]
    alone = [augment(x[k], twin(g), FULL) for k, g in enumerate(gens)]
    draws = Draws.cat([draw(g, 8, FULL) for g in gens])
    together = apply(x.reshape(24, 784), draws, FULL).view(3, 8, 784)
    assert torch.allclose(together, torch.stack(alone), rtol=0, atol=1e-6)


@cuda
@pytest.mark.cuda
def test_cuda_generator_draws_the_same_eagerly_and_in_a_cuda_graph():
    """Draws from a non-default CUDA generator inside a captured graph: N replays give what N eager steps from
    the same state give, and leave the generator in the same state (what a resumed run relies on)."""
    x = digits(64).reshape(64, 784).cuda()
    g = gen(5, "cuda")
    eager_g = twin(g)
    assert torch.equal(augment(x, twin(g), FULL), augment(x, twin(g), FULL))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as the engine's _capture does: real steps
        run_steps(x, g, 2)
    torch.cuda.current_stream().wait_stream(side)
    run_steps(x, eager_g, 2)
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():  # a deprecated no-op where torch registers generators itself
        warnings.simplefilter("ignore")
        if hasattr(graph, "register_generator_state"):
            graph.register_generator_state(g)
    static_x = x.clone()
    with torch.cuda.graph(graph):
        static_out = augment(static_x, g, FULL)
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(static_out.clone())
    eager = run_steps(x, eager_g, 3)
    assert all(torch.equal(a, b) for a, b in zip(replayed, eager))
    assert torch.equal(g.get_state(), eager_g.get_state())


# ----------------------------------------------------------------------------- inside training (train.augment)
AUGMENTED = ["train.augment.translate=2", "train.augment.degrees=10", "train.augment.scale=[0.9,1.1]",
             "train.augment.shear=5", "train.augment.elastic_alpha=8", "train.augment.elastic_sigma=3"]


def _weights(path):
    from dlbase.training import checkpoint
    return checkpoint.load(path)["model"]


def test_train_augment_draws_once_per_training_image_and_never_for_validation(tiny_config, monkeypatch):
    """Every training step augments its batch, validation never: the images augment() sees are exactly the
    training steps' (3 epochs of the tiny set's training split), and the augmented run learns something else."""
    import dlbase.core.augment as aug
    from dlbase.core.config import load_config
    from dlbase.training.train import train
    seen = []
    real = aug.augment
    monkeypatch.setattr(aug, "augment", lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    plain = train(load_config(tiny_config, ["name=plain"]), log=lambda s: None)
    assert seen == []  # off by default: not called at all
    run = train(load_config(tiny_config, AUGMENTED), log=lambda s: None)
    n_train = 500  # tiny_data: 600 training samples less val_size 100 (10 steps of 50 per epoch)
    assert sum(seen) == 3 * n_train and max(seen) == 50
    a, b = _weights(plain.folder / "last.ckpt"), _weights(run.folder / "last.ckpt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_an_augmented_run_stopped_mid_epoch_resumes_bit_identically(tiny_config, tmp_path, monkeypatch):
    """Oracle: the uninterrupted augmented run. The augmentation's generator is saved in every checkpoint
    (rng["augment"]) and restored, so the resumed run draws what the uninterrupted one drew."""
    from conftest import StopAt
    from dlbase.core.config import load_config
    from dlbase.training import checkpoint
    from dlbase.training import train as train_module
    full = train_module.train(load_config(tiny_config, AUGMENTED + [f"checkpoint.dir={tmp_path / 'a'}"]),
                              log=lambda s: None)
    monkeypatch.setattr(train_module, "Preemption", StopAt(15))  # in epoch 2 of 3 (10 steps each)
    cut_cfg = load_config(tiny_config, AUGMENTED + [f"checkpoint.dir={tmp_path / 'b'}"])
    cut = train_module.train(cut_cfg, log=lambda s: None)
    assert cut.status == "preempted"
    last = cut.folder / "last.ckpt"
    payload = checkpoint.load(last)
    assert payload["in_epoch"]["batch"] > 0 and "augment" in payload["rng"]
    monkeypatch.undo()
    train_module.train(cut_cfg, resume=last, resume_payload=payload, log=lambda s: None)
    a, b = _weights(full.folder / "last.ckpt"), _weights(last)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad, key", [("train.augment.scale=[1.1,0.9]", "train.augment.scale"),
                                      ("train.augment.degrees=200", "train.augment.degrees"),
                                      ("train.augment.translate=-1", "train.augment.translate"),
                                      ("train.augment.elastic_sigma=0", "train.augment.elastic_sigma"),
                                      ("train.augment.rotate_by=3", "train.augment.rotate_by")])
def test_bad_augment_settings_are_one_line_and_exit_2(tiny_config, bad, key):
    from typer.testing import CliRunner
    from dlbase.cli import app
    r = CliRunner().invoke(app, ["train", "--config", str(tiny_config), "--set", bad])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in r.output, r.output
