"""Data randomisation (SPEC §2.3; Adebayo et al. 2018 §4): the trained model's maps against the maps of
its label-randomised twin, the same architecture trained on the same images with the labels permuted.

The twin has memorised labels that carry no relation to the images, so a map that explains what the
model learned must change; a map that draws the image (edges) stays. Both maps are for the trained
model's top class c. Rows: one per metric, state "label_randomised", with ``chance`` (the original map
against the twin's maps of the partner images) and ``retest``; read like MPRT (retention R, low passes).
Unlike MPRT it randomises no layer of the trained model, so it is not subject to the critique of
top-down randomisation (Binder et al. 2023): the independent check of the MPRT verdicts.

The twin: ``weights``, a state_dict file of the model's architecture (loaded into a copy of the model),
else the project's own for the reference models (``saliency.models.load_label_twin``: trained on first
use until it has memorised the permuted labels, then cached). Any other model cannot take the test; it
says so before any work.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from saliency.models import load_label_twin, load_weights_file, reference_architecture
from saliency.options import check_options, option
from saliency.passes import forward_logits
from saliency.sanity.base import Block, SanityTest, as_2d

logger = logging.getLogger(__name__)
STATE = "label_randomised"


@dataclass(frozen=True)
class DataRandomizationOptions:
    weights: str | None = option(
        None, "a state_dict file of the model's architecture trained on the same data with the labels permuted "
        "(its label-randomised twin); None: the project's twin of the reference models, trained once and "
        "cached; any other model then cannot take the test")

    def __post_init__(self) -> None:
        check_options(self)


# model → {twin source: (twin on the model's device, where it came from)}: every batch of a worker asks,
# the twin is built once per model
_TWINS: "WeakKeyDictionary[nn.Module, dict[tuple, tuple[nn.Module, str]]]" = WeakKeyDictionary()


def label_twin(model: nn.Module, options: DataRandomizationOptions) -> tuple[nn.Module | None, str]:
    """(the label-randomised twin of ``model``, on its device and in eval mode, and where it came from),
    or (None, why there is none). A weights file that does not fit the model is a ValueError."""
    if options.weights is not None:
        path = Path(options.weights)
        if not path.is_file():
            raise ValueError(f"the data randomisation twin's weights file {str(path)!r} does not exist")
        stat = path.stat()
        source: tuple = ("file", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    elif (architecture := reference_architecture(model)) is not None:
        source = ("reference", architecture)
    else:
        return None, ("no label-randomised twin: the project trains one for the reference models only; give the "
                      "test's `weights` option, a state_dict of this architecture trained on permuted labels")
    known = _TWINS.setdefault(model, {})
    if source not in known:
        if source[0] == "file":
            twin = copy.deepcopy(model)
            load_weights_file(twin, path)
            how = f"weights file {source[1]}"
        else:
            twin, info = load_label_twin(source[1])
            when = "loaded from the cache" if info["cached"] else f"trained now in {info['seconds']:.0f} s"
            how = (f"the project's {source[1]} twin: {info['epochs']} epochs on permuted labels, training accuracy "
                   f"{info.get('train_accuracy', float('nan')):.3f} (held-out digits {info['accuracy']:.3f}), {when} "
                   f"({info['cache_path']})")
            logger.info("data randomisation: %s", how)
        parameter = next(model.parameters(), None)
        if parameter is not None:
            twin = twin.to(device=parameter.device, dtype=parameter.dtype)
        known[source] = (twin.eval(), how)
    return known[source]


@dataclass(frozen=True)
class DataRandomization(SanityTest):
    def applicable(self, model, example: Tensor, options) -> str | None:
        twin, why = label_twin(model, options)
        if twin is None:
            return why
        with torch.no_grad():
            mine, theirs = forward_logits(model, example), forward_logits(twin, example)
        if mine.shape != theirs.shape:
            return f"its twin ({why}) gives outputs of shape {tuple(theirs.shape)}, the model {tuple(mine.shape)}"
        return None

    def provenance(self, model, options) -> str | None:
        twin, how = label_twin(model, options)
        return how if twin is not None else None

    def block_count(self, run) -> int:
        return 1

    def blocks(self, run) -> Iterator[Block]:
        twin, _ = label_twin(run.model, run.options(self))
        maps = run.explain(twin, run.top[:, None], prefix=None)  # another model: nothing of the recorded forward
        yield Block(self.id, STATE, 0, run.top, {m: as_2d(v[:, 0]) for m, v in maps.items()})

    def rows_per_image(self, settings, n_states: int) -> int:
        return len(list(settings.metrics))


DATA_RANDOMIZATION = DataRandomization(
    id="data_randomization", title="Data randomisation", options=DataRandomizationOptions,
    scope_words={STATE: "twin trained on permuted labels"},
    controls=(("edge_sobel", None, "fail"), ("random", None, "uninformative"), ("gradient", None, "pass")),
    description="Data randomisation (Adebayo et al. 2018): retention R of the trained model's top-class map in "
                "the map of its twin trained on the same images with permuted labels. A map that explains "
                "what the model learned must change: R near 0 passes, R near 1 fails.")
