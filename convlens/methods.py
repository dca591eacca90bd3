"""The registry of visualization methods: one name per method.

A method's name is, everywhere: its callback file (`callbacks/<name>.py`), its config
(`conf/callbacks/<name>.yaml`, key `callbacks.<name>`), its callback's `name` (the
`viz_time/<name>` scalar), the prefix of every TensorBoard tag it logs (`<name>/...` or
`<name>_<kind>/...`, or one of the method's `other_prefixes`), and `convlens-visualize
method=<name>`. `tests/test_methods.py` checks that all of these agree with this table.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    #: the callback class, in `convlens.callbacks`
    callback: str
    #: the pure algorithm it draws, in `convlens.viz`
    algorithm: str
    #: in the default callback set (`callbacks=default`)
    default: bool
    summary: str
    #: tag prefixes besides `<name>` and `<name>_<kind>`, where the method's specification names them
    other_prefixes: tuple[str, ...] = ()

    def callback_class(self) -> type:
        return getattr(importlib.import_module(f"convlens.callbacks.{self.name}"), self.callback)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("deconv", "DeconvProjection", "deconvnet", True,
           "Zeiler & Fergus deconvnet projections of the maps of each probe image's top units, and each "
           "unit's most activating validation image"),
    Method("decoded", "DecodedFilters", "decoding", True,
           "filters decoded to image space by substitution (Rafegas & Vanrell) and their Eq. 3 error"),
    Method("occlusion", "OcclusionSensitivity", "occlusion", True,
           "a gray patch slid over each probe image: p(target) and the predicted label per position"),
    Method("suppression", "KernelSuppression", "suppression", False,
           "an input that keeps one kernel's map and suppresses the layer's others (Zhuang et al.)"),
    Method("top_activations", "TopActivations", "top_activations", False,
           "for selected units, the validation patches that activate them most"),
    Method("saliency", "Saliency", "saliency", False,
           "Grad-CAM, guided backpropagation and guided Grad-CAM of the probe images"),
    Method("evolution", "FilterEvolution", "deconvnet", True,
           "one fixed unit per layer projected every epoch, the first layer's weights, weight change"),
    Method("faithfulness", "Faithfulness", "faithfulness", False,
           "deletion / insertion AUC, ROAD and the model-randomization sanity check of each explanation",
           other_prefixes=("sanity",)),  # sanity/<method>/...: Adebayo et al.'s check, as issue #21 names it
    Method("mistakes", "Mistakes", "knn", False,
           "misclassified validation images beside their nearest training images, the confusion matrix, "
           "per-class accuracy, the embedding projector"),
    Method("dissection", "UnitDissection", "dissection", False,
           "every unit each epoch: its Neuron Feature, class and colour selectivity (Rafegas et al.), "
           "Morcos et al.'s class selectivity, dead units; a CSV of every unit"),
    Method("feature_viz", "FeatureVisualization", "feature_visualization", False,
           "the image each selected unit wants to see, by optimization (Olah et al.), warm-started each epoch"),
)}


def method(name: str) -> Method:
    """The method called `name` (or one of its `ALIASES`); a ConfigError listing the valid names
    otherwise."""
    from convlens.errors import ConfigError

    name = ALIASES.get(name, name)
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS) + list(ALIASES), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"Unknown method {name!r}; {hint}use one of {', '.join(METHODS)}")
    return METHODS[name]


#: other names users know a method by (pytorch-grad-cam, tf-explain, Captum)
ALIASES = {"gradcam": "saliency", "grad_cam": "saliency", "guided_backprop": "saliency",
           "guided_gradcam": "saliency", "deconvnet": "deconv"}
