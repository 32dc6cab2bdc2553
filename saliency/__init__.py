"""saliency-sanity: do saliency maps explain the model, or only draw the image's edges?

    import saliency
    maps = saliency.explain(model, x, ["gradcampp", "gradcampp/signed"], targets)
    saliency.similarity(maps["gradcampp"][:, 0], other[:, 0], "ssim")
    saliency.sanity.parameter_randomization(model, x, ["gradient", "fullgrad"])
"""
from saliency import sanity
from saliency.engine import explain
from saliency.layers import default_cam_layer
from saliency.methods import available_methods, method_table
from saliency.randomize import randomization_states
from saliency.similarity import similarity

__all__ = ["explain", "default_cam_layer", "available_methods", "method_table", "similarity", "randomization_states", "sanity"]
__version__ = "0.1.0"
