"""Sanity tests over a batch (SPEC §2) as long-format Arrow score tables.

- ``class_sensitivity``: similarity between the map for the top class and maps for other classes.
- ``mprt``: similarity between maps of the trained model and of randomised states (Adebayo et al. 2018);
  ``emprt``: the relative rise of map entropy on the same states (Hedström et al. 2023); ``smprt``: MPRT on
  maps averaged over noisy copies of the input (Hedström et al. 2023).
- ``data_randomization``: similarity between maps of the trained model and of its twin trained on permuted
  labels (Adebayo et al. 2018 §4).
- ``grid_pointing``: the share of a 2×2 grid's positive attribution in the explained class's image (Böhle et
  al. 2022); ``deletion``: the symmetric relevance gain of MoRF/LeRF deletion curves against a random map
  (Blücher et al. 2024).
Each similarity row carries its two references (SPEC §4): ``chance`` (the same comparison against other
images' maps: the mean over K = 10 partners of the batch, a seeded choice per image) and ``retest`` (1 for deterministic methods, the
similarity of two draws with different seeds for stochastic ones). ``saliency.statistics`` turns them into
the normalised retention R = (s − c)/(r − c), verdicts and the paper's paired comparisons.

``SanityRun`` runs any registered tests in one pass (``registry``); ``class_sensitivity`` and
``parameter_randomization`` are the two classic calls.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import pyarrow as pa
from torch import Tensor, nn

from saliency.sanity.base import (CHANCE_PARTNERS, ORIGINAL, SCORE_SCHEMA, Block, NoOptions, SanityTest, Settings,
                                  as_2d, chance_partners, make_test_options, options_of, paired, random_other_classes,
                                  retest_seed)
from saliency.sanity.classes import OTHERS, ClassSensitivityOptions, class_targets
from saliency.sanity.emprt import ENTROPY_BINS, ENTROPY_METRIC, discrete_entropy, entropy_rise
from saliency.sanity.mprt import CASCADE, CASCADE_INDEX, TARGET_MODES, RandomizationOptions, head_state_index
from saliency.sanity.registry import available_tests, get_test, register, sanity_tests
from saliency.sanity.rules import VERDICTS, Verdict, VerdictRules, ci_verdict, retention_verdict
from saliency.sanity.runner import Progress, SanityRun, run_sanity

__all__ = [
    "CHANCE_PARTNERS", "ORIGINAL", "SCORE_SCHEMA", "paired", "Block", "NoOptions", "SanityTest", "Settings",
    "make_test_options", "options_of", "SanityRun", "Progress", "run_sanity", "as_2d", "chance_partners",
    "random_other_classes", "retest_seed", "OTHERS", "ClassSensitivityOptions", "class_targets", "ENTROPY_BINS",
    "ENTROPY_METRIC", "discrete_entropy", "entropy_rise", "CASCADE", "CASCADE_INDEX", "TARGET_MODES",
    "RandomizationOptions", "head_state_index", "available_tests", "get_test", "register", "sanity_tests",
    "VERDICTS", "Verdict", "VerdictRules", "ci_verdict", "retention_verdict", "class_sensitivity",
    "parameter_randomization",
]


def class_sensitivity(model: nn.Module, x: Tensor, methods: str | Sequence[str],
                      others: Sequence[str] = ("min", "random", "second"),
                      metrics: str | Sequence[str] = ("ssim", "spearman_abs"), seed: int = 0, *,
                      image_ids: Sequence[str] | None = None, labels=None, model_name: str = "model",
                      layer: str | None = None, explain_kwargs: dict | None = None,
                      chance_partners: int = CHANCE_PARTNERS, progress: Progress | None = None) -> pa.Table:
    """Similarity of each image's map for its top class with its maps for other classes (SPEC §2.1).

    One forward pass picks the classes; one explain call computes the maps for all of them. See
    ``saliency.sanity.class_sensitivity`` for the rows. "random" is drawn per image id: pass real
    ``image_ids`` so that the draw does not depend on batch position. ``progress(done, total)`` is
    called as the explain calls finish.
    """
    settings = Settings(methods=methods, tests=["class_sensitivity"], metrics=metrics, seed=seed, layer=layer,
                        explain_kwargs=explain_kwargs or {}, chance_partners=chance_partners,
                        options={"class_sensitivity": {"others": [others] if isinstance(others, str) else others}})
    return run_sanity(model, x, settings, progress, image_ids=image_ids, labels=labels, model_name=model_name)


def parameter_randomization(model: nn.Module, x: Tensor, methods: str | Sequence[str],
                            order: str = "cascade_top_down", granularity: str = "module",
                            init: str = "reset", metrics: str | Sequence[str] = ("ssim", "spearman_abs"),
                            target: str = "original", seed: int = 0, *, bn_stats: str = "reset",
                            sigma: float = 0.01, states: Iterable[int] | None = None, emprt: bool = True,
                            randomization_seeds: Sequence[int] | None = None,
                            image_ids: Sequence[str] | None = None, labels=None, model_name: str = "model",
                            layer: str | None = None, explain_kwargs: dict | None = None,
                            chance_partners: int = CHANCE_PARTNERS, progress: Progress | None = None) -> pa.Table:
    """MPRT and (if ``emprt``) eMPRT scores of each image for each randomisation state and seed (SPEC §2.2).

    The original maps are computed once under the trained model for its top class; each state k (all,
    or ``states``) is built for every seed of ``randomization_seeds`` (default: ``seed`` alone),
    explained, scored and freed. See ``saliency.sanity.mprt`` and ``saliency.sanity.emprt`` for the rows.
    ``progress(done, total)`` is called after the original maps and after every state (a state of a
    large model on a CPU takes seconds to minutes).
    """
    randomization = RandomizationOptions(order=order, granularity=granularity, init=init, sigma=sigma,
                                         bn_stats=bn_stats, target=target, seeds=randomization_seeds,
                                         states=None if states is None else tuple(states))
    settings = Settings(methods=methods, tests=["mprt", "emprt"] if emprt else ["mprt"], metrics=metrics,
                        seed=seed, layer=layer, explain_kwargs=explain_kwargs or {}, chance_partners=chance_partners,
                        options={"mprt": randomization})
    return run_sanity(model, x, settings, progress, image_ids=image_ids, labels=labels, model_name=model_name)
