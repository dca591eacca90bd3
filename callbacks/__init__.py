"""Lightning callbacks that draw each visualization method into TensorBoard as training goes.

    from convlens.callbacks import DeconvProjection, FilterEvolution, OcclusionSensitivity
    trainer = Trainer(callbacks=[DeconvProjection(), FilterEvolution(), OcclusionSensitivity()])

One callback per method of `convlens.methods.METHODS`; `VisualizationCallback` is their shared base.
"""
from convlens.callbacks.base import VisualizationCallback
from convlens.callbacks.decoded import DecodedFilters
from convlens.callbacks.deconv import DeconvProjection
from convlens.callbacks.dissection import UnitDissection
from convlens.callbacks.evolution import FilterEvolution
from convlens.callbacks.faithfulness import Faithfulness
from convlens.callbacks.feature_viz import FeatureVisualization
from convlens.callbacks.layout import TensorBoardLayout
from convlens.callbacks.mistakes import Mistakes
from convlens.callbacks.occlusion import OcclusionSensitivity
from convlens.callbacks.saliency import Saliency
from convlens.callbacks.suppression import KernelSuppression
from convlens.callbacks.top_activations import TopActivations

__all__ = ["VisualizationCallback", "DeconvProjection", "FilterEvolution", "DecodedFilters", "OcclusionSensitivity",
           "Saliency", "TopActivations", "KernelSuppression", "Faithfulness", "FeatureVisualization", "Mistakes",
           "UnitDissection", "TensorBoardLayout"]
