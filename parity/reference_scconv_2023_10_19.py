"""The reference as published on 2023-10-19 (commit cf3b372, the repository's current head): 2023-09-14
(`reference_scconv_2023_09_14.py`) with these changes, all in `SRU`:
- `torch_gn` defaults to True (PyTorch's `nn.GroupNorm`);
- `w_gamma = self.gn.weight / sum(self.gn.weight)` (the builtin `sum` again);
- a soft gate on `x` instead of the hard masks on `gn_x`:
  `w1 = where(reweigts > t, 1, reweigts)`, `w2 = where(reweigts > t, 0, reweigts)`,
  `x_1 = w1 * x`, `x_2 = w2 * x`.
"""
import torch

import reference_scconv_2023_09_12 as earlier


class SRU(earlier.SRU):
    def __init__(self, oup_channels: int, group_num: int = 16, gate_treshold: float = 0.5,
                 torch_gn: bool = True):
        super().__init__(oup_channels, group_num=group_num, gate_treshold=gate_treshold, torch_gn=torch_gn)

    def forward(self, x):
        gn_x = self.gn(x)
        w_gamma = self.gn.weight / sum(self.gn.weight)
        w_gamma = w_gamma.view(1, -1, 1, 1)
        reweigts = self.sigomid(gn_x * w_gamma)
        w1 = torch.where(reweigts > self.gate_treshold, torch.ones_like(reweigts), reweigts)
        w2 = torch.where(reweigts > self.gate_treshold, torch.zeros_like(reweigts), reweigts)
        x_1 = w1 * x
        x_2 = w2 * x
        y = self.reconstruct(x_1, x_2)
        return y


class ScConv(earlier.ScConv):
    def __init__(self, op_channel: int, group_num: int = 4, gate_treshold: float = 0.5,
                 alpha: float = 1 / 2, squeeze_radio: int = 2, group_size: int = 2,
                 group_kernel_size: int = 3, torch_gn: bool = True):
        super().__init__(op_channel, group_num, gate_treshold, alpha, squeeze_radio, group_size,
                         group_kernel_size, torch_gn, sru=SRU)
