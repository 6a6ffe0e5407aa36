"""The learned optimizer of "Learning to learn by gradient descent by gradient descent"
(Andrychowicz et al. 2016): a coordinatewise two-layer LSTM, one fused op per step."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pymeta import ops


class LSTMOptimizerNet(nn.Module):
    """Coordinatewise LSTM optimizer: every coordinate of the optimizee is one batch element.

    Parameters are exactly those of ``cell1 = nn.LSTMCell(n_in, H)``, ``cell2 =
    nn.LSTMCell(H, H)`` and ``out = nn.Linear(H, 1)`` (n_in = 2 for ``"log_sign"``, 1 for
    ``"none"``), so state_dicts of that shape load. The step itself runs as one fused op,
    ``pymeta.ops.lstm_optimizer_step`` (native kernel or reference, per ``pymeta.set_backend``).

    State: ``[4, H, N]`` = (h1, c1, h2, c2), feature-major (see ``init_state``).
    """

    def __init__(self, hidden_size: int = 20, preprocessing: str = "log_sign", p: float = 10.0,
                 out_scale: float = 0.1):
        super().__init__()
        if preprocessing not in ("log_sign", "none"):
            raise ValueError(f"LSTMOptimizerNet: preprocessing must be 'log_sign' or 'none', "
                             f"not {preprocessing!r}")
        if not 1 <= hidden_size <= 64:
            raise ValueError(f"LSTMOptimizerNet: hidden_size must be in [1, 64], got {hidden_size}")
        self.hidden_size = hidden_size
        self.preprocessing = preprocessing
        self.p = float(p)
        self.out_scale = float(out_scale)
        n_in = 2 if preprocessing == "log_sign" else 1
        self.cell1 = nn.LSTMCell(n_in, hidden_size)
        self.cell2 = nn.LSTMCell(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    def weights(self) -> tuple[Tensor, ...]:
        """The 10 weights in the op's order."""
        c1, c2 = self.cell1, self.cell2
        return (c1.weight_ih, c1.weight_hh, c1.bias_ih, c1.bias_hh, c2.weight_ih, c2.weight_hh,
                c2.bias_ih, c2.bias_hh, self.out.weight, self.out.bias)

    def init_state(self, n: int, device=None, dtype=None) -> Tensor:
        """Zero state for n coordinates: ``[4, H, n]`` (h1, c1, h2, c2). Device and dtype
        default to the parameters'."""
        w = self.out.weight
        return torch.zeros(4, self.hidden_size, n, device=device if device is not None else w.device,
                           dtype=dtype if dtype is not None else w.dtype)

    def forward(self, grad: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """grad of any shape (N elements), state ``[4, H, N]`` -> (update of grad's shape,
        new_state ``[4, H, N]``)."""
        update, new_state = ops.lstm_optimizer_step(
            grad.reshape(-1), state, *self.weights(), self.preprocessing, self.p, self.out_scale)
        return update.reshape(grad.shape), new_state

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, preprocessing={self.preprocessing!r}, "
                f"p={self.p}, out_scale={self.out_scale}")
