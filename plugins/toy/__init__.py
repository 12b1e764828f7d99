"""difftilt.plugins.toy: an analytic Gaussian-mixture diffusion with exact score and exact tilted targets.

It is the core's proof of correctness (the fine-tuned samples can be compared with the
closed-form ``p* ∝ p_pre exp(r / alpha)``) and the worked example of a plugin.
"""

from .domain import DEFAULT_MIXTURE, ToyDomain, exactness_metrics, make_mixture_process
from .mixture import GaussianMixture, sliced_w2_to_mixture
from .process import MixtureDiffusionProcess, vp_schedule
from .rewards import BumpsReward, LinearReward, QuadraticReward

__all__ = [
    "ToyDomain",
    "GaussianMixture",
    "MixtureDiffusionProcess",
    "LinearReward",
    "QuadraticReward",
    "BumpsReward",
    "make_mixture_process",
    "exactness_metrics",
    "sliced_w2_to_mixture",
    "vp_schedule",
    "DEFAULT_MIXTURE",
]
