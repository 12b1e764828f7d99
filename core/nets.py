"""Small networks the core uses by default: controls, value functions, initial-law drifts.

Domains with large states (image latents, long sequences) supply their own networks;
these defaults suit states of up to a few hundred dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ConfigMixin

__all__ = ["TimeMLP"]


class TimeMLP(ConfigMixin, nn.Module):
    """An MLP on a flattened state and a scalar time in ``[0, 1]``.

    ``f(x, t) = MLP([flatten(x), sin(pi 2^j t), cos(pi 2^j t)]_{j < time_features})``,
    reshaped to ``out_shape``. With ``zero_init`` the last layer starts at zero, so a
    control built from it starts as the identity tilt (``h = 0``): fine-tuning starts
    exactly at the reference model.

    Args:
        in_shape: shape of one input state, e.g. ``(2,)``.
        out_shape: shape of one output, e.g. ``(2,)`` for a control or ``()`` for a value.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        time_features: number of sine/cosine frequency pairs for ``t`` (0: ignore ``t``).
        zero_init: start the output layer at zero.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...] | list[int],
        out_shape: tuple[int, ...] | list[int] = (),
        hidden: int = 64,
        depth: int = 2,
        time_features: int = 6,
        zero_init: bool = True,
    ):
        super().__init__()
        self.register_to_config(
            in_shape=list(in_shape), out_shape=list(out_shape), hidden=hidden, depth=depth,
            time_features=time_features, zero_init=zero_init,
        )
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        d_in = math.prod(self.in_shape)
        d_out = math.prod(self.out_shape)
        self.time_features = int(time_features)
        freqs = math.pi * 2.0 ** torch.arange(self.time_features, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        # The first layer is split: W [x; emb(t)] = W_x x + W_t emb(t), and W_t emb(t) is one
        # row shared by the batch -- cheaper than concatenating the embedding to every row.
        self.inp = nn.Linear(d_in, hidden if depth > 0 else d_out)
        self.inp_t = nn.Linear(2 * self.time_features, self.inp.out_features, bias=False) if self.time_features else None
        layers: list[nn.Module] = []
        for _ in range(max(depth - 1, 0)):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        if depth > 0:
            layers += [nn.SiLU(), nn.Linear(hidden, d_out)]
        self.body = nn.Sequential(*layers)
        last = layers[-1] if layers else self.inp
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            if not layers and self.inp_t is not None:
                nn.init.zeros_(self.inp_t.weight)

    def forward(self, x: Tensor, t: float | Tensor = 0.0) -> Tensor:
        """``x``: ``(b, *in_shape)``; ``t``: a float or ``(b,)``. Returns ``(b, *out_shape)``."""
        b = x.shape[0]
        h = self.inp(x.reshape(b, -1))
        if self.inp_t is not None:
            h = h + self.inp_t(self._time_embedding(t, h))
        return self.body(h).reshape(b, *self.out_shape)

    def _time_embedding(self, t: float | Tensor, like: Tensor) -> Tensor:
        """``[sin(pi 2^j t), cos(pi 2^j t)]``: ``(1, 2F)`` for a float ``t``, ``(b, 2F)`` for a tensor.

        Chains call the network with the same few float times over and over, so those
        embeddings (constants) are cached.
        """
        if isinstance(t, Tensor):
            tt = t.to(like.dtype).reshape(-1, 1) * self.freqs.to(like.dtype)
            return torch.cat([torch.sin(tt), torch.cos(tt)], dim=-1)
        key = (float(t), like.dtype, like.device)
        cache = self.__dict__.setdefault("_emb_cache", {})
        emb = cache.get(key)
        if emb is None:
            if len(cache) > 4096:
                cache.clear()
            tt = torch.tensor([[float(t)]], dtype=torch.float64, device=like.device) * self.freqs.to(like.device, torch.float64)
            emb = cache[key] = torch.cat([torch.sin(tt), torch.cos(tt)], dim=-1).to(like.dtype)
        return emb
