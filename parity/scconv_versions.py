"""Builds the PyTorch twin that a Rust `ScConvConfig` describes: its `variant` picks the reference
version (`reference_scconv*.py`), `torch_gn` is passed where the version has it, and `fuse: "paper"`
swaps the CRU's fuse for the paper's (`paper_fuse.py`). Also: which gate rule a version uses, and its
GroupNorm's shift parameter (for making a trained-looking model)."""
import torch.nn.functional as F
import torch

import reference_scconv
import reference_scconv_2023_09_12
import reference_scconv_2023_09_14
import reference_scconv_2023_10_19

MODULES = {
    "2023-07-27": reference_scconv,
    "2023-09-12": reference_scconv_2023_09_12,
    "2023-09-14": reference_scconv_2023_09_14,
    "2023-10-19": reference_scconv_2023_10_19,
}
HYPER = ("group_num", "gate_treshold", "alpha", "squeeze_radio", "group_size", "group_kernel_size")


def build(config):
    """The twin of `config` (a dict as the Rust side serialises `ScConvConfig`; missing keys take the
    version's defaults)."""
    variant = config.get("variant", "2023-07-27")
    kwargs = {k: config[k] for k in HYPER if k in config}
    if variant != "2023-07-27" and "torch_gn" in config:
        kwargs["torch_gn"] = config["torch_gn"]
    model = MODULES[variant].ScConv(config["op_channel"], **kwargs)
    if config.get("fuse", "global") == "paper":
        model.CRU.forward = paper_fuse_forward.__get__(model.CRU)
    return model


def paper_fuse_forward(self, x):
    """The CRU with the paper's fuse (SKNet-style): S1 = GAP(Y1), S2 = GAP(Y2),
    beta_k = e^Sk / (e^S1 + e^S2) per channel, Y = beta1 * Y1 + beta2 * Y2."""
    up, low = torch.split(x, [self.up_channel, self.low_channel], dim=1)
    up, low = self.squeeze1(up), self.squeeze2(low)
    Y1 = self.GWC(up) + self.PWC1(up)
    Y2 = torch.cat([self.PWC2(low), low], dim=1)
    S1, S2 = self.advavg(Y1), self.advavg(Y2)
    beta = F.softmax(torch.stack([S1, S2], dim=0), dim=0)
    return beta[0] * Y1 + beta[1] * Y2


def soft_gate(config):
    """2023-10-19 gates with `reweigts > t` (weights 1 / 0, else the sigmoid); the others with `>=`."""
    return config.get("variant", "2023-07-27") == "2023-10-19"


def gn_shift(model):
    """The SRU GroupNorm's additive parameter: `beta` in the seed, `bias` later."""
    gn = model.SRU.gn
    return gn.beta if hasattr(gn, "beta") else gn.bias


def gn_scale(model):
    """The SRU GroupNorm's multiplicative parameter: `gamma` in the seed, `weight` later."""
    gn = model.SRU.gn
    return gn.gamma if hasattr(gn, "gamma") else gn.weight
