"""Augmentation on the device: random integer translations, affine transforms (rotation, scale, shear,
translation) and elastic distortions (Simard et al. 2003) of a batch of images, as pure batched tensor functions.

The calling contract
--------------------
* A batch is x (B, H, W), or (B, H*W) with `shape=(H, W)` given (default 28x28); the output has x's shape and
  dtype (float32 and float64 are sampled in their own dtype, anything else in float32 and rounded back).
* Every random number comes from the `torch.Generator` passed in, which must be on x's device. What each
  function draws, in this order, is part of the contract (a seeded generator then draws the same augmentations
  in a resumed run as in an uninterrupted one): `affine` one `rand(B, 5)`; `elastic` one `rand(B, 2, H, W)`;
  `translate` one `randint(-m, m + 1, (B, 2))`; `augment` draws the enabled ones in that order (affine,
  elastic, translate), so `augment` with one stage on equals that stage's function from the same state.
* No host syncs, no Python branching on tensor values, no loop over images, no host-to-device copies: every
  shape and branch follows from host numbers (the spec, B, H, W), so a step that calls `augment` can be
  captured as one CUDA graph. Nothing here reads the config or holds state.
* `augment` applies the affine transform and the elastic field in one resampling (out(p) = x(A(p + d(p))),
  which is elastic(affine(x)) without interpolating twice), then the integer translation (exact, zero fill).
* `draw` and `apply` split `augment` in two: a population draws each member's parameters from that member's
  own generator (K small draws) and applies them to the (K*B, ...) batch at once.

Inside a CUDA graph
-------------------
* Use a CUDA generator of the augmentation's own (`torch.Generator(device=x.device).manual_seed(s)`), not the
  Batcher's: a mid-epoch resume rewinds the Batcher's generator to its epoch's start to redraw the order, while
  the augmentation's draws must go on from where the checkpoint was taken. Save its `get_state()` at every
  checkpoint (a host read of seed and offset, no sync) and `set_state()` it on resume.
* torch 2.14.1 (the one checked here) registers a non-default generator with the graph being captured on its
  first draw, and `CUDAGraph.register_generator_state` is a deprecated no-op (pytorch PR 176753). Releases from
  before that change, torch 2.6 included, need `graph.register_generator_state(gen)` before
  `with torch.cuda.graph(graph):`, or the capture fails with "philox_cuda_state for an unexpected CUDA generator
  used during capture". Calling it wherever it exists, with its deprecation warning silenced, covers both.
* A capture draws nothing from the generator's host state; each replay advances it by the graph's whole
  increment, the sum of the eager step's increments, and the replay's kernels read the seed and offset that the
  replay fills in. So eager warm-up steps, the capture and N replays leave the generator where N + warm-up eager
  steps would, and draw the same numbers: a resumed run may warm up and capture at another step than the
  uninterrupted one did. (tests/test_augment.py's CUDA test checks this paragraph; no GPU has run it yet.)
* `graphsafe_get_state` / `graphsafe_set_state` are not needed: they swap the state object a generator points
  to (for switching between several RNG streams inside one capture); a graph keeps the object it captured, so
  restore a generator with `set_state`, which copies seed and offset into that same object.
* A throwaway warm-up (the Engine's `prewarm`) must save and restore this generator too, as it does
  torch.cuda's default one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dlbase.core.schema import AugmentConfig

MNIST_SHAPE = (28, 28)  # (H, W) of a flat (B, 784) batch


@dataclass(frozen=True)
class Draws:
    """One batch's random parameters on the device, as `draw` takes them from a generator; None: stage off."""
    affine: Optional[torch.Tensor] = None  # (n, 5): angle (deg), scale, shear (deg), tx, ty (pixels)
    noise: Optional[torch.Tensor] = None  # (n, 2, H, W): the elastic field (dx, dy) before smoothing, in [-1, 1]
    shifts: Optional[torch.Tensor] = None  # (n, 2) int64: (dx, dy) pixels

    @staticmethod
    def cat(parts: Sequence["Draws"]) -> "Draws":
        """The draws of several batches (e.g. a population's members) as one, in order."""
        def join(name):
            got = [getattr(p, name) for p in parts]
            return None if got[0] is None else torch.cat(got)
        return Draws(join("affine"), join("noise"), join("shifts"))


# ---------------------------------------------------------------------------------------------- the draws
def draw_affine(gen: torch.Generator, n: int, degrees: float, scale: tuple[float, float], shear: float,
                translate: float, shape: tuple[int, int]) -> torch.Tensor:
    """(n, 5) float32: angle in [-degrees, degrees], scale in [lo, hi], shear in [-shear, shear] (degrees),
    tx, ty in [-translate, translate] * (W, H) pixels; one rand(n, 5) whatever the ranges."""
    u = torch.rand(n, 5, generator=gen, device=gen.device)
    sym = u * 2 - 1  # (n, 5) in [-1, 1]
    lo, hi = scale
    h, w = shape
    return torch.stack([sym[:, 0] * degrees, lo + u[:, 1] * (hi - lo), sym[:, 2] * shear,
                        sym[:, 3] * (translate * w), sym[:, 4] * (translate * h)], dim=1)


def draw_noise(gen: torch.Generator, n: int, shape: tuple[int, int]) -> torch.Tensor:
    """(n, 2, H, W) float32 uniform in [-1, 1]: the raw elastic field, channel 0 dx, channel 1 dy."""
    return torch.rand(n, 2, *shape, generator=gen, device=gen.device).mul_(2).sub_(1)


def draw_shifts(gen: torch.Generator, n: int, max_shift: int) -> torch.Tensor:
    """(n, 2) int64 (dx, dy), each uniform over the integers in [-max_shift, max_shift]."""
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen, device=gen.device)


def draw(gen: torch.Generator, n: int, spec: AugmentConfig, shape: tuple[int, int] = MNIST_SHAPE) -> Draws:
    """The random parameters of `augment` for n images: the enabled stages' draws, affine, elastic, translate."""
    return Draws(
        affine=draw_affine(gen, n, spec.degrees, spec.scale, spec.shear, 0.0, shape) if spec.affine else None,
        noise=draw_noise(gen, n, shape) if spec.elastic else None,
        shifts=draw_shifts(gen, n, spec.translate) if spec.translate else None,
    )


# ---------------------------------------------------------------------------------------- the transforms
def affine_theta(params: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(n, 5) parameters -> (n, 2, 3) float64 matrices for F.affine_grid (align_corners=False): for each output
    pixel, where to sample the input. torchvision's affine (its _get_inverse_affine_matrix, about the image's
    centre, x-shear only), batched, then rescaled from centred pixels to grid_sample's [-1, 1] coordinates."""
    p = params.double()
    rot, scale, sx, tx, ty = torch.deg2rad(p[:, 0]), p[:, 1], torch.deg2rad(p[:, 2]), p[:, 3], p[:, 4]
    cos, sin, tan = torch.cos(rot), torch.sin(rot), torch.tan(sx)
    # forward rotation-shear [[a, b], [c, d]] (determinant 1); its inverse [[d, -b], [-c, a]], divided by scale
    a, b, c, d = cos, -cos * tan - sin, sin, -sin * tan + cos
    m00, m01, m10, m11 = d / scale, -b / scale, -c / scale, a / scale
    m02, m12 = -(m00 * tx + m01 * ty), -(m10 * tx + m11 * ty)  # undo the translation first
    h, w = shape
    # centred pixels (x, y) = (x_n * w/2, y_n * h/2) on both sides of the map
    return torch.stack([torch.stack([m00, m01 * (h / w), m02 * (2 / w)], 1),
                        torch.stack([m10 * (w / h), m11, m12 * (2 / h)], 1)], 1)


def _blur_matrix(n: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n): row i is the unit vector e_i blurred by a Gaussian of std sigma with reflect padding, so a blur
    along that axis is one matmul. torchvision's gaussian_blur kernel (int(8 sigma + 1) taps, made odd), its
    radius capped below n as reflect padding needs."""
    r = min((int(8 * sigma + 1) | 1) // 2, n - 1)
    t = torch.linspace(-r, r, 2 * r + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    eye = torch.eye(n, device=device, dtype=dtype)[:, None]  # (n, 1, n)
    return F.conv1d(F.pad(eye, (r, r), mode="reflect"), (k / k.sum()).view(1, 1, -1))[:, 0]


def _gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """(n, C, H, W) -> (n, C, H, W): the separable Gaussian blur as Mh^T @ field @ Mw (two small matmuls: a
    conv1d over every row of the batch is ten times slower on a CPU)."""
    h, w = field.shape[-2:]
    mh, mw = (_blur_matrix(s, sigma, field.device, field.dtype) for s in (h, w))
    return mh.T @ field @ mw


def elastic_displacement(noise: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """(n, 2, H, W) raw field -> (n, H, W, 2) displacement (dx, dy) in pixels: alpha * Gaussian(sigma) * noise
    (Simard et al. 2003, section 2.1). torchvision's ElasticTransform(alpha_tv, sigma) makes the same field from
    the same noise with alpha_tv = 2 * alpha (it scales by alpha_tv / W in [-1, 1] units, W / 2 pixels each)."""
    smooth = _gaussian_smooth(noise, sigma) if sigma > 0 else noise
    return (smooth * alpha).permute(0, 2, 3, 1)


def _resample(img: torch.Tensor, params: Optional[torch.Tensor], noise: Optional[torch.Tensor],
              alpha: float, sigma: float) -> torch.Tensor:
    """(n, H, W) -> (n, H, W): out(p) = img(A(p + d(p))), A from params (n, 5) or the identity, d the elastic
    displacement of noise (n, 2, H, W) or 0; one bilinear grid_sample, zeros outside, align_corners=False."""
    n, h, w = img.shape
    eye = torch.eye(2, 3, device=img.device, dtype=img.dtype)[None]  # (1, 2, 3)
    points = F.affine_grid(eye, (1, 1, h, w), align_corners=False)  # (1, H, W, 2): each output pixel p
    if noise is not None:
        units = torch.full((2,), 2 / w, device=img.device, dtype=img.dtype)
        units[1] = 2 / h  # a fill on the device; pixels -> [-1, 1] units, per axis
        disp = elastic_displacement(noise.to(img.dtype), alpha, sigma)  # (n, H, W, 2) pixels
        points = torch.addcmul(points, disp, units)  # (n, H, W, 2): p + d(p)
    grid = points.expand(n, h, w, 2)
    if params is not None:
        # A q = theta @ (qx, qy, 1), elementwise: what affine_grid does with a bmm of inner size 3, which a CPU
        # runs slowly (a third of the affine stage's time at 256 x 28 x 28)
        t = affine_theta(params, (h, w)).to(img.dtype)[:, None, None]  # (n, 1, 1, 2, 3)
        grid = torch.addcmul(torch.addcmul(t[..., 2], t[..., 0], points[..., :1]), t[..., 1], points[..., 1:])
    return F.grid_sample(img.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).squeeze(1)


def shift_images(img: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """(n, H, W) shifted by shifts (n, 2) = (dx, dy) integer pixels, |dx|, |dy| <= max_shift, zeros coming in:
    out[b, i, j] = img[b, i - dy, j - dx] where that is inside, the same as torch.roll with zero fill. No
    interpolation: a zero-padded copy and two gathers."""
    n, h, w = img.shape
    m = max_shift
    padded = F.pad(img, (m, m, m, m))  # (n, H+2m, W+2m); padded[b, i+m, j+m] = img[b, i, j]
    rows = torch.arange(h, device=img.device) + m - shifts[:, 1:2]  # (n, H) source rows in padded
    cols = torch.arange(w, device=img.device) + m - shifts[:, 0:1]  # (n, W) source columns
    picked = padded.gather(1, rows[:, :, None].expand(n, h, w + 2 * m))  # (n, H, W+2m)
    return picked.gather(2, cols[:, None, :].expand(n, h, w))  # (n, H, W)


# ------------------------------------------------------------------------------------------- the face
def _check_device(x: torch.Tensor, device: torch.device, what: str) -> None:
    if device.type != x.device.type or (x.device.type != "cpu" and device.index != x.device.index):
        raise ValueError(f"the {what} on {device} and the batch on {x.device}: draw on the batch's device")


def _images(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """x (B, H, W) or (B, H*W) -> (B, H, W), in a float dtype that grid_sample takes."""
    if x.dim() == 2 and x.shape[1] == shape[0] * shape[1]:
        x = x.view(x.shape[0], *shape)
    elif x.dim() != 3:
        raise ValueError(f"a batch of shape {tuple(x.shape)} is neither (B, H, W) nor (B, {shape[0] * shape[1]})")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def apply(x: torch.Tensor, draws: Draws, spec: AugmentConfig, shape: tuple[int, int] = MNIST_SHAPE) -> torch.Tensor:
    """x with the drawn augmentations applied: the affine transform and the elastic field in one resampling,
    then the integer translation. x (n, H, W) or (n, H*W); draws for n images (`draw`, or `Draws.cat`) made
    with this spec (its translate is the padding the shifts fit in, its elastic_alpha and sigma shape the field)."""
    for t in (draws.affine, draws.noise, draws.shifts):
        if t is not None:
            _check_device(x, t.device, "draws are")
    img = _images(x, shape)
    if draws.affine is not None or draws.noise is not None:
        img = _resample(img, draws.affine, draws.noise, spec.elastic_alpha, spec.elastic_sigma)
    if draws.shifts is not None:
        img = shift_images(img, draws.shifts, spec.translate)
    return img.to(x.dtype).reshape(x.shape)


def augment(x: torch.Tensor, gen: torch.Generator, spec: AugmentConfig,
            shape: tuple[int, int] = MNIST_SHAPE) -> torch.Tensor:
    """A training batch x (B, H, W) or (B, H*W), augmented as spec says with draws from gen; x itself when the
    spec is off (no draw, no kernel)."""
    if not spec.enabled:
        return x
    _check_device(x, gen.device, "generator is")
    hw = tuple(_images(x, shape).shape[1:])  # (H, W): shape, or x's own when x is (B, H, W)
    return apply(x, draw(gen, x.shape[0], spec, hw), spec, hw)


def translate(x: torch.Tensor, gen: torch.Generator, max_shift: int,
              shape: tuple[int, int] = MNIST_SHAPE) -> torch.Tensor:
    """Each image shifted by its own random integer (dx, dy) in [-max_shift, max_shift], zeros coming in."""
    _check_device(x, gen.device, "generator is")
    img = _images(x, shape)
    return shift_images(img, draw_shifts(gen, img.shape[0], max_shift), max_shift).to(x.dtype).reshape(x.shape)


def affine(x: torch.Tensor, gen: torch.Generator, degrees: float = 0.0, scale: tuple[float, float] = (1.0, 1.0),
           shear: float = 0.0, translate: float = 0.0, shape: tuple[int, int] = MNIST_SHAPE) -> torch.Tensor:
    """One random affine transform per image about its centre: rotation in [-degrees, degrees] (clockwise
    positive, as torchvision's affine), zoom in scale = (lo, hi), x-shear in [-shear, shear] degrees, translation
    in [-translate, translate] of the width and height (a fraction, not rounded); bilinear, zeros outside."""
    _check_device(x, gen.device, "generator is")
    img = _images(x, shape)
    params = draw_affine(gen, img.shape[0], degrees, scale, shear, translate, img.shape[1:])
    return _resample(img, params, None, 0.0, 0.0).to(x.dtype).reshape(x.shape)


def elastic(x: torch.Tensor, gen: torch.Generator, alpha: float, sigma: float,
            shape: tuple[int, int] = MNIST_SHAPE) -> torch.Tensor:
    """Simard et al. 2003's elastic distortion: per image a field uniform in [-1, 1] for dx and dy, smoothed by a
    Gaussian of std sigma pixels, scaled by alpha pixels, sampled bilinearly (zeros outside)."""
    _check_device(x, gen.device, "generator is")
    img = _images(x, shape)
    return _resample(img, None, draw_noise(gen, img.shape[0], img.shape[1:]), alpha, sigma) \
        .to(x.dtype).reshape(x.shape)


class Augmenter:
    """A run's augmentation of its training batches: its train.augment section, the images' (H, W), and a
    generator of its own on the device, whose state every checkpoint keeps (training/state.py's rng_state), so a
    resumed run draws what the uninterrupted one would. Calling it augments a (B, H*W) batch."""

    def __init__(self, cfg: AugmentConfig, shape: tuple[int, int], device: torch.device, seed: int):
        self.cfg, self.shape = cfg, (int(shape[0]), int(shape[1]))
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return augment(x, self.generator, self.cfg, self.shape)

    def draw(self, n: int) -> Draws:
        """This run's draws for a batch of n (a population draws each member's, then applies them at once)."""
        return draw(self.generator, n, self.cfg, self.shape)


def augmenter(cfg: AugmentConfig, shape: tuple[int, int], device: torch.device, seed: int,
              rank: int = 0) -> Optional[Augmenter]:
    """The Augmenter of a run with this train.augment, or None when every stage is off. Its generator's seed
    comes from the run's seed (and its rank under torchrun: each rank augments its own slice of the batch)."""
    if not cfg.enabled:
        return None
    return Augmenter(cfg, shape, device, (seed * 1_000_003 + 0xA116 + rank * 7919) % 2**63)
