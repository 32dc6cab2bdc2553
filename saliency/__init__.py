"""saliency-sanity: do saliency maps explain the model, or only draw the image's edges?"""
from saliency.engine import explain
from saliency.methods import available_methods, method_table

__all__ = ["explain", "available_methods", "method_table"]
__version__ = "0.1.0"
