"""difftilt: fine-tune pretrained diffusion models toward a reward without reward hacking.

The domain-agnostic library is :mod:`difftilt.core`; domains live in
``difftilt.plugins.<domain>`` and are found through the ``difftilt.plugins`` entry points.
"""

__version__ = "0.1.0"
