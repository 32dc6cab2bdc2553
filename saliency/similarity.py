"""Similarity of two batches of saliency maps (SPEC §3), batched in torch on the maps' device.

Every metric compares image i of `a` with image i of `b` and nothing else: normalisation is per
image, so a score never depends on the rest of the batch. Work is done in float64 (the oracles,
skimage and scipy, are matched to 1e-5 / 1e-6); scores come back as float32 on the input device.

Conventions worth knowing:
- A pair in which either map holds NaN or inf scores NaN.
- Correlations (`spearman`, `spearman_abs`, `pearson`, `hog_pearson`) of a constant map (zero
  variance, e.g. all zeros) are NaN, as is `cosine` with an all-zero map: "undefined" is not
  "dissimilar".
- `ssim` of constant maps is defined by its formula thanks to C1 and C2 (two identical constant maps
  score 1); we return that value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saliency.choices import check_choice

METRICS: tuple[str, ...] = (
    "ssim", "spearman", "spearman_abs", "pearson", "cosine", "hog_pearson", "topk_intersection",
)
NORMALIZATIONS: tuple[str, ...] = ("max_abs", "percentile_clip", "none")

# Natural SSIM data range of each normalisation: max_abs maps lie in [-1, 1], percentile_clip maps
# in [0, 1]. A fixed range (not one estimated per image) keeps SSIM comparable across methods.
DEFAULT_DATA_RANGE: dict[str, float] = {"max_abs": 2.0, "percentile_clip": 1.0}

# HOG as in Adebayo et al.: skimage.feature.hog with 16×16-pixel cells. One cell per block, so that
# 28×28 MNIST maps (a single cell) still have a descriptor, and plain L2 block normalisation: with a
# 9-value block, L2-Hys clips every bin above 0.2 of the norm and flattens spread-out histograms
# to a constant vector (whose correlation is undefined).
HOG_ORIENTATIONS = 9
HOG_PIXELS_PER_CELL = 16
HOG_CELLS_PER_BLOCK = 1
HOG_BLOCK_NORM = "L2"

_PERCENTILES = (0.01, 0.99)
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_HOG_EPS = 1e-5


def normalize(maps: Tensor, method: str = "max_abs") -> Tensor:
    """Normalise each B×H×W map on its own (never over the batch).

    `max_abs` divides by max|S| (an all-zero map stays zero); `percentile_clip` clips to the image's
    1st/99th percentile (numpy's linear interpolation) and rescales to [0, 1] (a map whose two
    percentiles coincide becomes zero); `none` returns the maps unchanged.
    """
    check_choice("normalization", method, NORMALIZATIONS)
    _check_rank(maps, "maps")
    if not maps.is_floating_point():
        maps = maps.float()
    if method == "none":
        return maps
    flat = maps.flatten(1)
    if method == "max_abs":
        scale = flat.abs().amax(dim=1, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (flat / scale).view_as(maps)
    low, high = (_quantile(flat, q) for q in _PERCENTILES)
    spread = high - low
    safe_spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    clipped = (torch.clamp(flat, low, high) - low) / safe_spread
    return torch.where(spread > 0, clipped, torch.zeros_like(clipped)).view_as(maps)


def similarity(a: Tensor, b: Tensor, metric: str, *, normalization: str = "max_abs",
               window: int = 5, data_range: float | None = None, k: float = 0.10) -> Tensor:
    """Score each pair (a[i], b[i]) of B×H×W maps with `metric`; returns a float32 tensor of B.

    `window` and `data_range` are SSIM's (uniform window, no Gaussian; `data_range` defaults to the
    normalisation's natural range, see DEFAULT_DATA_RANGE, and must be given for `none`). `k` is the
    fraction of pixels `topk_intersection` keeps (top by signed value, ties broken by pixel index).
    Equal to ``compare(prepare(a, …), prepare(b, …))``.
    """
    check_choice("metric", metric, METRICS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    _check_rank(a, "a")
    _check_rank(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    options = {"normalization": normalization, "window": window, "data_range": data_range, "k": k}
    return compare(prepare(a, metric, **options), prepare(b, metric, **options))


@dataclass(frozen=True)
class Prepared:
    """B maps made ready for one metric: the per-map half of ``similarity`` (normalisation, ranks,
    HOG, top-k masks), so a map compared many times (an original map against every MPRT state, a
    state's map against its own image and its chance partner) is prepared once."""

    metric: str
    features: Tensor   # B×… per-map features of the metric
    finite: Tensor     # B bool: the raw map held no NaN/inf
    window: int = 5
    data_range: float = 2.0
    moments: Tensor | None = None  # ssim: B×2×h×w local mean and variance, so a pair costs its cross term only

    def select(self, index: Tensor) -> "Prepared":
        """The prepared maps of images ``index`` (e.g. each image's chance partners)."""
        index = index.to(self.features.device)
        moments = None if self.moments is None else self.moments[index]
        return replace(self, features=self.features[index], finite=self.finite[index], moments=moments)


def prepare(maps: Tensor, metric: str, *, normalization: str = "max_abs", window: int = 5,
            data_range: float | None = None, k: float = 0.10) -> Prepared:
    """The per-map work of ``similarity(·, ·, metric)`` for B×H×W maps; pair two with ``compare``."""
    check_choice("metric", metric, METRICS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    _check_rank(maps, "maps")
    x = normalize(maps.to(torch.float64), normalization)
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    if metric == "ssim":
        return Prepared(metric, x, finite, window, _ssim_data_range(data_range, normalization),
                        _ssim_moments(x, window))
    if metric == "topk_intersection":
        return Prepared(metric, _top_mask(x.flatten(1), k), finite)
    if metric == "hog_pearson":
        return Prepared(metric, _hog(x), finite)
    if metric in ("spearman", "spearman_abs"):
        # Ranks depend only on the order of the values, which max_abs's positive scale keeps: float32 maps
        # are ranked as they are (distinct float32 values stay distinct through the float64 division, so
        # the ranks are bit-identical), at half the cost of sorting the float64 copy.
        rows = (maps if maps.dtype == torch.float32 and normalization != "percentile_clip" else x).flatten(1)
        return Prepared(metric, _average_ranks(rows.abs() if metric == "spearman_abs" else rows), finite)
    return Prepared(metric, x.flatten(1), finite)  # pearson, cosine


def compare(a: Prepared, b: Prepared) -> Tensor:
    """Score each pair (a[i], b[i]) of prepared maps (float32 B, NaN where either map was not finite)."""
    if a.metric != b.metric or a.features.shape != b.features.shape:
        raise ValueError(f"prepared maps do not match: {a.metric} {tuple(a.features.shape)} and "
                         f"{b.metric} {tuple(b.features.shape)}")
    x, y = a.features, b.features
    if a.metric == "ssim":
        scores = _ssim(x, y, a.window, a.data_range, a.moments, b.moments)
    elif a.metric == "topk_intersection":
        scores = (x & y).sum(dim=1).to(torch.float64) / x.sum(dim=1)  # each row keeps the same count
    elif a.metric in ("hog_pearson", "spearman", "spearman_abs", "pearson"):
        scores = _pearson(x, y)
    else:
        scores = _cosine(x, y)
    finite = a.finite & b.finite
    scores = torch.where(finite, scores, torch.full_like(scores, float("nan")))
    return scores.to(torch.float32)


def _check_rank(maps: Tensor, name: str) -> None:
    if not isinstance(maps, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape B×H×W, got {type(maps).__name__}")
    if maps.dim() != 3:
        raise ValueError(
            f"{name} must have shape B×H×W (3 dimensions), got {tuple(maps.shape)}; "
            "reduce channels and targets first")


def _quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row quantile, numpy's linear interpolation, via one sort (no torch.quantile size cap)."""
    ordered = rows.sort(dim=1).values
    position = q * (rows.shape[1] - 1)
    below, above = math.floor(position), math.ceil(position)
    low, high = ordered[:, below:below + 1], ordered[:, above:above + 1]
    return low + (high - low) * (position - below)


def _ssim_data_range(data_range: float | None, normalization: str) -> float:
    if data_range is None:
        if normalization not in DEFAULT_DATA_RANGE:
            raise ValueError(
                f"data_range is required for ssim with normalization {normalization!r}; "
                f"it has a default only for: {', '.join(DEFAULT_DATA_RANGE)}")
        return DEFAULT_DATA_RANGE[normalization]
    if not data_range > 0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    return float(data_range)


def _ssim_moments(x: Tensor, window: int) -> Tensor:
    """B×2×h×w: each window's mean and sample variance, the half of SSIM that is per map."""
    height, width = x.shape[1:]
    if not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 3, got {window!r}")
    if window > min(height, width):
        raise ValueError(f"window {window} is larger than the maps ({height}×{width}); "
                         f"allowed: an odd window <= {min(height, width)}")
    mean = _local_mean(x, window)
    return torch.stack([mean, _covariance_norm(window) * (_local_mean(x * x, window) - mean * mean)], dim=1)


def _local_mean(t: Tensor, window: int) -> Tensor:
    """Mean of each window fully inside the map (skimage's cropped region)."""
    return F.avg_pool2d(t.unsqueeze(1), window, stride=1).squeeze(1)


def _covariance_norm(window: int) -> float:
    n = window * window
    return n / (n - 1)


def _ssim(x: Tensor, y: Tensor, window: int, data_range: float, x_moments: Tensor | None = None,
          y_moments: Tensor | None = None) -> Tensor:
    """skimage's SSIM (uniform window, sample covariance), mean over windows inside the image; the
    maps' own moments may come precomputed (``_ssim_moments``)."""
    ux, vx = (_ssim_moments(x, window) if x_moments is None else x_moments).unbind(1)
    uy, vy = (_ssim_moments(y, window) if y_moments is None else y_moments).unbind(1)
    vxy = _covariance_norm(window) * (_local_mean(x * y, window) - ux * uy)
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return ssim_map.flatten(1).mean(dim=1)


def _average_ranks(rows: Tensor) -> Tensor:
    """1-based ranks per row, ties sharing their average rank (scipy's 'average'), in O(N log N). Tied
    values get the same rank whichever order the sort leaves them in, so the sort need not be stable; on
    the CPU numpy's sort is used (4×50 176 floats: 2.0 ms against torch's 6.3 ms)."""
    if rows.device.type == "cpu":
        order = torch.from_numpy(np.argsort(rows.detach().numpy(), axis=1))
        values = rows.gather(1, order)
    else:
        values, order = rows.sort(dim=1)
    n = rows.shape[1]
    position = torch.arange(n, device=rows.device).expand_as(order)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=1).values
    last_from_end = torch.where(ends, position, torch.full_like(position, n - 1)).flip(1)
    last = last_from_end.cummin(dim=1).values.flip(1)
    average = (first + last).to(torch.float64) / 2 + 1
    return torch.empty_like(average).scatter_(1, order, average)


def _is_constant(rows: Tensor) -> Tensor:
    return rows.amax(dim=1) == rows.amin(dim=1)


def _pearson(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise Pearson r; NaN where a row is constant (exact test, not rounding-noise variance)."""
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    r = (xc * yc).sum(dim=1) / torch.sqrt((xc * xc).sum(dim=1) * (yc * yc).sum(dim=1))
    r = r.clamp(-1.0, 1.0)
    undefined = _is_constant(x) | _is_constant(y)
    return torch.where(undefined, torch.full_like(r, float("nan")), r)


def _cosine(x: Tensor, y: Tensor) -> Tensor:
    norms = x.norm(dim=1) * y.norm(dim=1)
    cos = ((x * y).sum(dim=1) / norms).clamp(-1.0, 1.0)
    return torch.where(norms > 0, cos, torch.full_like(cos, float("nan")))


def _top_mask(rows: Tensor, k: float) -> Tensor:
    """The top-k fraction of pixels (by signed value) of each row; among equal values the lower
    index wins (stable sort)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    count = max(1, int(k * rows.shape[1] + 0.5))
    top = rows.sort(dim=1, descending=True, stable=True).indices[:, :count]
    return torch.zeros_like(rows, dtype=torch.bool).scatter_(1, top, True)


def _hog(maps: Tensor, orientations: int = HOG_ORIENTATIONS,
         pixels_per_cell: int = HOG_PIXELS_PER_CELL,
         cells_per_block: int = HOG_CELLS_PER_BLOCK, block_norm: str = HOG_BLOCK_NORM) -> Tensor:
    """skimage.feature.hog (block_norm "L2" or "L2-Hys", no sqrt transform): B×H×W -> B×F."""
    check_choice("HOG block_norm", block_norm, ("L2", "L2-Hys"))
    height, width = maps.shape[1:]
    smallest = pixels_per_cell * cells_per_block
    if height < smallest or width < smallest:
        raise ValueError(f"hog_pearson needs maps of at least {smallest}×{smallest} pixels "
                         f"({pixels_per_cell}-pixel cells), got {height}×{width}")
    g_row = torch.zeros_like(maps)
    g_row[:, 1:-1, :] = maps[:, 2:, :] - maps[:, :-2, :]
    g_col = torch.zeros_like(maps)
    g_col[:, :, 1:-1] = maps[:, :, 2:] - maps[:, :, :-2]
    magnitude = torch.hypot(g_col, g_row)
    degrees = torch.atan2(g_row, g_col) * (180.0 / math.pi)
    orientation = torch.fmod(degrees, 180.0)  # numpy's `% 180`: fmod, then shift negatives
    orientation = torch.where(orientation < 0, orientation + 180.0, orientation)

    cells_high, cells_wide = height // pixels_per_cell, width // pixels_per_cell
    cropped_h, cropped_w = cells_high * pixels_per_cell, cells_wide * pixels_per_cell
    magnitude = magnitude[:, :cropped_h, :cropped_w]
    orientation = orientation[:, :cropped_h, :cropped_w]
    # skimage's bin edges are float32 values: bin i holds [edge_i, edge_{i+1}).
    edges = [float(np.float32(180.0 / orientations * i)) for i in range(orientations + 1)]
    votes = torch.stack([magnitude * ((orientation >= low) & (orientation < high))
                         for low, high in zip(edges[:-1], edges[1:])], dim=1)
    histogram = F.avg_pool2d(votes, pixels_per_cell)  # B×orientations×cells_high×cells_wide

    blocks = histogram.unfold(2, cells_per_block, 1).unfold(3, cells_per_block, 1)
    # B×blocks_h×blocks_w×(cell_row, cell_col, bin), skimage's feature order
    blocks = blocks.permute(0, 2, 3, 4, 5, 1).flatten(3)
    blocks = _l2_normalize(blocks)
    if block_norm == "L2-Hys":
        blocks = _l2_normalize(blocks.clamp(max=0.2))
    return blocks.flatten(1)


def _l2_normalize(blocks: Tensor) -> Tensor:
    return blocks / torch.sqrt((blocks * blocks).sum(dim=-1, keepdim=True) + _HOG_EPS ** 2)
