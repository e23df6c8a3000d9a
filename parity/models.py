"""ResNets in torchvision's layout (same module names, so the same state-dict keys), plain or with SCConv.

SC variant: every residual-block 3x3 conv whose input and output channel counts are equal becomes the
reference ScConv (`reference_scconv.ScConv`, or the twin of another version and settings that the
config's `"scconv"` names, e.g. `{"variant": "2023-10-19"}`: `scconv_versions.build`): Bottleneck `conv2`, BasicBlock `conv2`, and BasicBlock `conv1`
where it keeps the channel count. Where that conv has stride 2, the block applies a 2x2 average pool after
the ScConv (`pool1` / `pool2`, no parameters), so the keys stay `...conv2.SRU.gn.gamma` and so on. A 3x3
conv that changes channels stays plain. The Rust twins are in `src/models/`.
"""
import torch
import torch.nn as nn

import scconv_versions


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def conv_or_scconv(in_planes, out_planes, stride, sc):
    """(conv, pool): ScConv (+ 2x2 average pool at stride 2) where the network is SC (`sc`: the ScConv
    settings, a block config without `op_channel`; None for a plain network) and the channels stay equal."""
    if sc is not None and in_planes == out_planes:
        scconv = scconv_versions.build(dict(sc, op_channel=out_planes))
        return scconv, (nn.AvgPool2d(2) if stride == 2 else nn.Identity())
    return conv3x3(in_planes, out_planes, stride), nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, sc=None):
        super().__init__()
        self.conv1, self.pool1 = conv_or_scconv(inplanes, planes, stride, sc)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.pool2 = conv_or_scconv(planes, planes, 1, sc)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.pool1(self.conv1(x))))
        out = self.bn2(self.pool2(self.conv2(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, sc=None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2, self.pool2 = conv_or_scconv(width, width, stride, sc)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.pool2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """torchvision's ResNet. `small_input` swaps the 7x7/2 stem and max pool for a 3x3/1 conv (28x28 and
    32x32 images); `widths` sets the stages (torchvision: 64, 128, 256, 512)."""

    def __init__(self, block, layers, widths=(64, 128, 256, 512), num_classes=1000, in_channels=3,
                 sc=False, small_input=False, scconv=None):
        super().__init__()
        block = BLOCKS[block]
        self.inplanes = widths[0]
        self.sc = dict(scconv or {}) if sc else None
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        for index, (width, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if index == 0 else 2
            setattr(self, f"layer{index + 1}", self._make_layer(block, width, blocks, stride))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[len(layers) - 1] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, sc=self.sc)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, sc=self.sc))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


ARCHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
}


def build(config):
    """A model from its JSON config (the same dict the Rust side reads; see src/models/config.rs)."""
    block, layers = ARCHS[config["arch"]] if "arch" in config else (config["block"], config["layers"])
    return ResNet(block, layers, widths=tuple(config.get("widths", (64, 128, 256, 512))),
                  num_classes=config.get("num_classes", 1000), in_channels=config.get("in_channels", 3),
                  sc=config.get("sc", False), small_input=config.get("small_input", False),
                  scconv=config.get("scconv"))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    for arch in ARCHS:
        plain, sc = build({"arch": arch}), build({"arch": arch, "sc": True})
        print(f"{arch}: plain {count_parameters(plain):,}  sc {count_parameters(sc):,}")
