"""The reference as published on 2023-09-14 (commit 4caff96): 2023-09-12
(`reference_scconv_2023_09_12.py`) with one change, in `SRU.forward`:
`w_gamma = self.gn.weight / torch.sum(self.gn.weight)` (was the builtin `sum`).
"""
import torch

import reference_scconv_2023_09_12 as previous
from reference_scconv_2023_09_12 import GroupBatchnorm2d  # noqa: F401  (unchanged)


class SRU(previous.SRU):
    def forward(self, x):
        gn_x = self.gn(x)
        w_gamma = self.gn.weight / torch.sum(self.gn.weight)
        w_gamma = w_gamma.view(1, -1, 1, 1)
        reweigts = self.sigomid(gn_x * w_gamma)
        info_mask = reweigts >= self.gate_treshold
        noninfo_mask = reweigts < self.gate_treshold
        x_1 = info_mask * gn_x
        x_2 = noninfo_mask * gn_x
        x = self.reconstruct(x_1, x_2)
        return x


class ScConv(previous.ScConv):
    def __init__(self, op_channel: int, group_num: int = 4, gate_treshold: float = 0.5,
                 alpha: float = 1 / 2, squeeze_radio: int = 2, group_size: int = 2,
                 group_kernel_size: int = 3, torch_gn: bool = False):
        super().__init__(op_channel, group_num, gate_treshold, alpha, squeeze_radio, group_size,
                         group_kernel_size, torch_gn, sru=SRU)
