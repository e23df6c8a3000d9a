"""The reference as `cheng-haha/ScConv` published it on 2023-09-12 (commit 0305aed, that day's last:
without the extra BatchNorm that 3f33756 added hours earlier), statement for statement, written as its
changes to the seed (`reference_scconv.py`, commit bebf345):
- `GroupBatchnorm2d`'s parameters are `weight` and `bias` (were `gamma`, `beta`);
- `SRU(..., torch_gn=False)`: `nn.GroupNorm` in place of `GroupBatchnorm2d` when set;
  `w_gamma = self.gn.weight / sum(self.gn.weight)`, then `.view(1, -1, 1, 1)`;
- the masks multiply `gn_x` (were `x`);
- `ScConv`'s `group_num` defaults to 4 (was 16).
`CRU` is unchanged (imported from the seed). One addition, marked below: upstream's `ScConv` passes no
`torch_gn` to its `SRU` (so `SRU`'s default holds); the twin forwards one, to test both settings.
"""
import torch
import torch.nn as nn

from reference_scconv import CRU  # noqa: F401  (unchanged since the seed)


class GroupBatchnorm2d(nn.Module):
    def __init__(self, c_num: int, group_num: int = 16, eps: float = 1e-10):
        super(GroupBatchnorm2d, self).__init__()
        assert c_num >= group_num
        self.group_num = group_num
        self.weight = nn.Parameter(torch.randn(c_num, 1, 1))
        self.bias = nn.Parameter(torch.zeros(c_num, 1, 1))
        self.eps = eps

    def forward(self, x):
        N, C, H, W = x.size()
        x = x.view(N, self.group_num, -1)
        mean = x.mean(dim=2, keepdim=True)
        std = x.std(dim=2, keepdim=True)
        x = (x - mean) / (std + self.eps)
        x = x.view(N, C, H, W)
        return x * self.weight + self.bias


class SRU(nn.Module):
    def __init__(self, oup_channels: int, group_num: int = 16, gate_treshold: float = 0.5,
                 torch_gn: bool = False):
        super().__init__()
        self.gn = nn.GroupNorm(num_channels=oup_channels, num_groups=group_num) if torch_gn else \
            GroupBatchnorm2d(c_num=oup_channels, group_num=group_num)
        self.gate_treshold = gate_treshold
        self.sigomid = nn.Sigmoid()

    def forward(self, x):
        gn_x = self.gn(x)
        w_gamma = self.gn.weight / sum(self.gn.weight)
        w_gamma = w_gamma.view(1, -1, 1, 1)
        reweigts = self.sigomid(gn_x * w_gamma)
        info_mask = reweigts >= self.gate_treshold
        noninfo_mask = reweigts < self.gate_treshold
        x_1 = info_mask * gn_x
        x_2 = noninfo_mask * gn_x
        x = self.reconstruct(x_1, x_2)
        return x

    def reconstruct(self, x_1, x_2):
        x_11, x_12 = torch.split(x_1, x_1.size(1) // 2, dim=1)
        x_21, x_22 = torch.split(x_2, x_2.size(1) // 2, dim=1)
        return torch.cat([x_11 + x_22, x_12 + x_21], dim=1)


class ScConv(nn.Module):
    # `torch_gn` is the twin's addition (see the module docstring).
    def __init__(self, op_channel: int, group_num: int = 4, gate_treshold: float = 0.5,
                 alpha: float = 1 / 2, squeeze_radio: int = 2, group_size: int = 2,
                 group_kernel_size: int = 3, torch_gn: bool = False, sru=SRU):
        super().__init__()
        self.SRU = sru(op_channel, group_num=group_num, gate_treshold=gate_treshold, torch_gn=torch_gn)
        self.CRU = CRU(op_channel, alpha=alpha, squeeze_radio=squeeze_radio,
                       group_size=group_size, group_kernel_size=group_kernel_size)

    def forward(self, x):
        x = self.SRU(x)
        x = self.CRU(x)
        return x
