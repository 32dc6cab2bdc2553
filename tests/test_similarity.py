"""Similarity metrics against their definitions: skimage SSIM and HOG, scipy spearmanr, numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from saliency.similarity import METRICS, _average_ranks, _hog, normalize, similarity

SHAPES = [(28, 28), (32, 48)]
CORRELATIONS = ["spearman", "spearman_abs", "pearson", "hog_pearson"]


def random_pairs(shape, batch=3, seed=0):
    """Independent, correlated and anti-correlated pairs of signed maps (numpy float64)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, *shape))
    noise = rng.normal(size=(batch, *shape))
    mix = np.array([0.0, 0.8, -0.6, 0.95, 0.3][:batch])[:, None, None]
    b = mix * a + np.sqrt(1 - mix ** 2) * noise
    return a, b


def max_abs(maps):
    return maps / np.abs(maps).max(axis=(1, 2), keepdims=True)


def score(a, b, metric, **options):
    return similarity(torch.from_numpy(a), torch.from_numpy(b), metric, **options).double().numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window, data_range", [(5, 2.0), (7, 0.5), (3, 2.0)])
def test_ssim_matches_skimage(shape, window, data_range):
    a, b = random_pairs(shape)
    ours = score(a, b, "ssim", window=window, data_range=data_range)
    expected = [structural_similarity(x, y, win_size=window, data_range=data_range,
                                      gaussian_weights=False)
                for x, y in zip(max_abs(a), max_abs(b))]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_ssim_default_data_range_is_the_normalisations_range():
    a, b = random_pairs((32, 48))
    np.testing.assert_allclose(score(a, b, "ssim"), score(a, b, "ssim", data_range=2.0), atol=0)
    clipped_a = normalize(torch.from_numpy(a), "percentile_clip").numpy()
    clipped_b = normalize(torch.from_numpy(b), "percentile_clip").numpy()
    expected = [structural_similarity(x, y, win_size=5, data_range=1.0, gaussian_weights=False)
                for x, y in zip(clipped_a, clipped_b)]
    ours = score(a, b, "ssim", normalization="percentile_clip")
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_ssim_without_normalisation_needs_a_data_range():
    a, b = random_pairs((28, 28))
    with pytest.raises(ValueError, match="data_range is required.*'none'"):
        score(a, b, "ssim", normalization="none")
    expected = [structural_similarity(x, y, win_size=5, data_range=8.0, gaussian_weights=False)
                for x, y in zip(a, b)]
    ours = score(a, b, "ssim", normalization="none", data_range=8.0)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_spearman_matches_scipy_with_many_ties(shape):
    a, b = random_pairs(shape, batch=4, seed=1)
    a, b = np.round(a * 2), np.round(b)  # a handful of distinct values: ties everywhere
    expected = [spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(score(a, b, "spearman"), expected, rtol=0, atol=1e-6)
    expected_abs = [spearmanr(np.abs(x).ravel(), np.abs(y).ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(score(a, b, "spearman_abs"), expected_abs, rtol=0, atol=1e-6)
    assert not np.allclose(expected, expected_abs)  # the |·| variant is a different question


def test_average_ranks_match_scipy_rankdata():
    rows = np.random.default_rng(2).integers(0, 5, size=(3, 200)).astype(np.float64)
    rows[1] = -rows[1]
    ours = _average_ranks(torch.from_numpy(rows)).numpy()
    np.testing.assert_array_equal(ours, rankdata(rows, axis=1, method="average"))


@pytest.mark.parametrize("shape", SHAPES)
def test_pearson_and_cosine_match_numpy(shape):
    a, b = random_pairs(shape, batch=4, seed=3)
    x, y = max_abs(a).reshape(4, -1), max_abs(b).reshape(4, -1)
    pearson = [np.corrcoef(u, v)[0, 1] for u, v in zip(x, y)]
    cosine = [u @ v / (np.linalg.norm(u) * np.linalg.norm(v)) for u, v in zip(x, y)]
    np.testing.assert_allclose(score(a, b, "pearson"), pearson, rtol=0, atol=1e-6)
    np.testing.assert_allclose(score(a, b, "cosine"), cosine, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, cells_per_block, block_norm",
                         [((28, 28), 1, "L2"), ((32, 48), 1, "L2"), ((32, 48), 2, "L2-Hys"),
                          ((50, 67), 2, "L2")])
def test_hog_features_match_skimage(shape, cells_per_block, block_norm):
    maps = np.random.default_rng(4).normal(size=(2, *shape))
    maps[:, :12, :12] = 0.25  # a flat patch: zero gradients, orientation exactly 0
    maps = np.round(maps * 3) / 3  # axis-aligned gradients land on bin edges
    ours = _hog(torch.from_numpy(maps), cells_per_block=cells_per_block,
                block_norm=block_norm).numpy()
    expected = [hog(m, orientations=9, pixels_per_cell=(16, 16),
                    cells_per_block=(cells_per_block, cells_per_block), block_norm=block_norm)
                for m in maps]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_hog_pearson_matches_skimage_and_numpy(shape):
    a, b = random_pairs(shape, batch=3, seed=5)

    def features(m):
        return hog(m, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(1, 1),
                   block_norm="L2")

    expected = [np.corrcoef(features(x), features(y))[0, 1] for x, y in zip(max_abs(a), max_abs(b))]
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(score(a, b, "hog_pearson"), expected, rtol=0, atol=1e-5)


def test_topk_intersection_on_a_hand_made_case():
    a = np.zeros((1, 4, 5))
    b = np.zeros((1, 4, 5))
    a[0].flat[[0, 3, 7, 19]] = [5, 4, 3, 2]     # top 20 % of 20 pixels = these 4
    b[0].flat[[0, 3, 7, 12]] = [1, 9, 8, 7]     # shares 3 of them
    b[0].flat[19] = -10                          # large magnitude, but the ranking is by value
    assert score(a, b, "topk_intersection", k=0.2) == pytest.approx([0.75])
    assert score(a, b, "topk_intersection", k=0.05) == pytest.approx([0.0])  # top 1: pixel 0 vs 3


def test_topk_intersection_breaks_ties_by_pixel_index():
    a = np.ones((1, 4, 5))                       # all tied: the top 4 are pixels 0..3
    b = np.zeros((1, 4, 5))
    b[0].flat[[2, 3, 10, 11]] = 1
    assert score(a, b, "topk_intersection", k=0.2) == pytest.approx([0.5])
    assert score(a, a, "topk_intersection", k=0.2) == pytest.approx([1.0])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("normalization", ["max_abs", "percentile_clip"])
def test_score_does_not_depend_on_the_rest_of_the_batch(metric, normalization):
    a, b = random_pairs((32, 48), batch=2, seed=6)
    other_a, other_b = a.copy(), b.copy()
    other_a[1] *= 1e6                            # a huge map would dominate any batch-wide scale
    other_b[1] = np.random.default_rng(7).normal(size=(32, 48)) - 50
    first = score(a, b, metric, normalization=normalization)
    second = score(other_a, other_b, metric, normalization=normalization)
    alone = score(a[:1], b[:1], metric, normalization=normalization)
    np.testing.assert_allclose(second[0], first[0], rtol=0, atol=1e-7)
    np.testing.assert_allclose(alone[0], first[0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES)
def test_identical_maps_score_one(metric, shape):
    a, _ = random_pairs(shape, batch=2, seed=8)
    np.testing.assert_allclose(score(a, a, metric), [1.0, 1.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("metric", CORRELATIONS + ["cosine"])
def test_correlations_of_a_constant_map_are_nan(metric):
    a, b = random_pairs((32, 48), batch=3, seed=9)
    a[0] = 0.0                                   # all zero
    b[1] = 3.0                                   # constant, non-zero
    scores = score(a, b, metric)
    if metric == "cosine":                       # a constant non-zero map has a direction
        assert np.isnan(scores[0]) and np.isfinite(scores[1:]).all()
    else:
        assert np.isnan(scores[:2]).all() and np.isfinite(scores[2])


def test_ssim_of_constant_maps_follows_its_formula():
    a, b = random_pairs((28, 28), batch=2, seed=10)
    a[:] = 0.0
    b[0] = 0.0
    scores = score(a, b, "ssim", window=5, data_range=2.0)
    assert scores[0] == pytest.approx(1.0)       # (C1·C2)/(C1·C2)
    expected = structural_similarity(a[1], max_abs(b[1:])[0], win_size=5, data_range=2.0)
    assert scores[1] == pytest.approx(expected, abs=1e-5)


def test_normalisations_are_per_image_and_keep_zero_maps_finite():
    maps = np.random.default_rng(11).normal(size=(3, 28, 28))
    maps[1] = 0.0
    maps[2] *= 1e3
    max_abs_maps = normalize(torch.from_numpy(maps), "max_abs").numpy()
    np.testing.assert_allclose(max_abs_maps[[0, 2]], max_abs(maps[[0, 2]]), rtol=1e-12)
    assert (max_abs_maps[1] == 0).all()

    clipped = normalize(torch.from_numpy(maps), "percentile_clip").numpy()
    for image, result in zip(maps[[0, 2]], clipped[[0, 2]]):
        low, high = np.percentile(image, [1, 99])
        np.testing.assert_allclose(result, (np.clip(image, low, high) - low) / (high - low),
                                   rtol=0, atol=1e-12)
    assert (clipped[1] == 0).all()
    assert torch.equal(normalize(torch.from_numpy(maps), "none"), torch.from_numpy(maps))


def test_non_finite_maps_score_nan_only_for_their_pair():
    a, b = random_pairs((28, 28), batch=2, seed=12)
    a[0, 3, 4] = np.nan
    for metric in METRICS:
        scores = score(a, b, metric)
        assert np.isnan(scores[0]) and np.isfinite(scores[1]), metric


def test_output_is_float32_of_length_batch_and_deterministic():
    a, b = random_pairs((28, 28), batch=3, seed=13)
    a32, b32 = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    for metric in METRICS:
        first = similarity(a32, b32, metric)
        assert first.dtype == torch.float32 and first.shape == (3,) and first.device == a32.device
        assert torch.equal(first, similarity(a32, b32, metric))


@pytest.mark.parametrize("options, message", [
    ({"metric": "ssim_gauss"}, r"unknown metric 'ssim_gauss'; allowed: ssim, spearman, .*topk"),
    ({"metric": "ssim", "normalization": "minmax"},
     r"unknown normalization 'minmax'; allowed: max_abs, percentile_clip, none"),
    ({"metric": "ssim", "window": 4}, r"window must be an odd integer >= 3, got 4"),
    ({"metric": "ssim", "window": 31}, r"window 31 is larger than the maps \(28×28\)"),
    ({"metric": "ssim", "data_range": 0.0}, r"data_range must be a positive number, got 0.0"),
    ({"metric": "topk_intersection", "k": 1.5}, r"k must be a fraction in \(0, 1\], got 1.5"),
    ({"metric": "topk_intersection", "k": 0}, r"k must be a fraction in \(0, 1\], got 0"),
])
def test_bad_options_name_the_value_and_the_allowed_ones(options, message):
    a = torch.rand(2, 28, 28)
    with pytest.raises(ValueError, match=message):
        similarity(a, a, **options)


def test_bad_shapes_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match=r"a must have shape B×H×W \(3 dimensions\), got \(2, 1"):
        similarity(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), "pearson")
    with pytest.raises(ValueError, match=r"same shape, got \(2, 8, 8\) and \(2, 8, 9\)"):
        similarity(torch.rand(2, 8, 8), torch.rand(2, 8, 9), "pearson")
    with pytest.raises(ValueError, match=r"maps must have shape B×H×W"):
        normalize(torch.rand(8, 8))
    with pytest.raises(ValueError, match=r"unknown normalization 'z'; allowed: max_abs"):
        normalize(torch.rand(1, 8, 8), "z")
    with pytest.raises(ValueError, match=r"unknown HOG block_norm 'L1'; allowed: L2, L2-Hys"):
        _hog(torch.rand(1, 16, 16), block_norm="L1")
    with pytest.raises(ValueError, match=r"hog_pearson needs maps of at least 16×16 .*got 15×40"):
        similarity(torch.rand(2, 15, 40), torch.rand(2, 15, 40), "hog_pearson")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_match_cpu_and_stay_on_the_device():
    a, b = random_pairs((32, 48), batch=3, seed=14)
    a[1] = np.round(a[1])                        # ties for the rank-based metrics
    cpu_a, cpu_b = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    for metric in METRICS:
        on_device = similarity(cpu_a.cuda(), cpu_b.cuda(), metric)
        assert on_device.device.type == "cuda" and on_device.dtype == torch.float32
        torch.testing.assert_close(on_device.cpu(), similarity(cpu_a, cpu_b, metric),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("metric", ["spearman", "spearman_abs"])
@pytest.mark.parametrize("normalization", ["max_abs", "none"])
def test_float32_maps_are_ranked_as_their_normalised_float64_copy(metric, normalization):
    """prepare() ranks float32 maps without normalising them first: the ranks (ties included, zeros of
    both signs, subnormals) equal those of the normalised float64 maps bit for bit."""
    from saliency.similarity import _average_ranks, prepare

    g = torch.Generator().manual_seed(3)
    maps = torch.randn(3, 20, 20, generator=g)
    maps[0] = maps[0].round()  # many ties
    maps[1, 0, :5] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17e-38])
    maps[2] = torch.nextafter(maps[2], torch.full_like(maps[2], 10.0)) * 1e30  # neighbouring floats, large
    normalised = normalize(maps.to(torch.float64), normalization).flatten(1)
    expected = _average_ranks(normalised.abs() if metric == "spearman_abs" else normalised)
    assert torch.equal(prepare(maps, metric, normalization=normalization).features, expected)
