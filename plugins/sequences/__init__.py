"""difftilt.plugins.sequences: masked discrete diffusion over proteins and DNA.

Install with ``pip install 'difftilt[sequences]'``. The default models (Ehrlich and
TFBind8) are small checkpoints made by ``difftilt pretrain`` from data that ships with the
package; each ``checkpoints/*/process.json`` records the exact command, data and seed.
"""

from .domain import (DNA, PROTEIN, BothStrands, EhrlichReward, OneHotFeatures, SequencesDomain, TFBind8Reward,
                     hamming_diversity, load_ehrlich, load_tfbind8)
from .descriptors import DescriptorConstraint, ProteinDescriptor
from .ehrlich import EhrlichFunction
from .function_reward import FunctionReward, MeasurementFile
from .plm import ESMReward
from .mdlm import MaskedDiffusionProcess, SequenceDenoiser, masked_diffusion_loss
from .pretrain import load_pretrained, save_pretrained, train_masked_diffusion
from .tfbind8 import TFBind8

__all__ = [
    "SequencesDomain", "EhrlichFunction", "TFBind8", "EhrlichReward", "TFBind8Reward", "OneHotFeatures", "BothStrands",
    "MaskedDiffusionProcess", "SequenceDenoiser", "masked_diffusion_loss", "train_masked_diffusion",
    "save_pretrained", "load_pretrained", "load_ehrlich", "load_tfbind8", "hamming_diversity", "PROTEIN", "DNA",
    "ESMReward", "ProteinDescriptor", "DescriptorConstraint", "FunctionReward", "MeasurementFile",
]
