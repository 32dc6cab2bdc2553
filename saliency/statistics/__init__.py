"""From score rows to answers (SPEC §4): normalised retention, bootstrap summaries, verdicts, and the
paper's paired pos/abs-vs-signed comparisons.

A raw similarity s means little on its own (an edge detector scores 1, noise 0), so every score row
carries its chance level c (the same comparison against other images' maps) and its retest level r
(1, or two draws of a stochastic method). The normalised retention R = (s̄ − c̄)/(r̄ − c̄) is 0 when the
maps changed as much as if they were other images', 1 when they did not change at all. It is a ratio of
means over the images (per randomisation seed, then averaged over seeds): the mean of per-image ratios
is dominated by the images with a small r − c (SPEC §4). Per-image R is kept for the paired comparisons.

Confidence intervals resample randomisation seeds (multinomially), then images (a two-level percentile
bootstrap). An image's resample weights are Poisson(1) draws hashed from (seed, image id, resample), so
per-shard partial sums merge into the same resamples (``SummaryAccumulator``): the summary of a run is
built one part at a time, and a CI is reproducible for a given seed and does not depend on the order of
the rows, on sharding, or on which other groups are in the table.

One module per idea: ``retention`` (R and the working table), ``bootstrap`` (the mergeable summary),
``verdicts`` (rules, verdicts, control checks), ``comparisons`` (the paired tests).
"""
from saliency.sanity import CASCADE
from saliency.statistics.bootstrap import SUMMARY_SCHEMA, SummaryAccumulator, image_weights, seed_weights, summarize
from saliency.statistics.comparisons import (COMPARISON_SCHEMA, ComparisonAccumulator, comparisons, curve_lengths,
                                             holm, rank_biserial)
from saliency.statistics.retention import GROUP_KEYS, QUANTITIES, retention
from saliency.sanity.rules import VERDICTS, VerdictRules
from saliency.statistics.verdicts import (VERDICT_SCHEMA, control_checks, control_expectations, control_methods,
                                          verdicts)

__all__ = ["CASCADE", "COMPARISON_SCHEMA", "ComparisonAccumulator", "GROUP_KEYS", "QUANTITIES",
           "SUMMARY_SCHEMA", "SummaryAccumulator", "VERDICTS", "VERDICT_SCHEMA", "VerdictRules", "comparisons",
           "control_checks", "control_expectations", "control_methods", "curve_lengths", "holm", "image_weights", "rank_biserial", "retention", "seed_weights",
           "summarize", "verdicts"]
