"""A PyTorch ResNet laid out exactly as ``torchvision.models.resnet`` (module names, state-dict keys, init), the
peer the ResNet tests convert from.

Why not torchvision itself: PyPI's torchvision wheels are linked against CUDA torch, and beside the CPU-only
torch this project's machines install, ``import torchvision`` fails while registering its compiled ops (and
then breaks ``transformers``, which imports torchvision whenever it is installed). The layer layout of He et
al. (2016) as torchvision builds it: a 7x7/2 conv + BN + ReLU + 3x3/2 max-pool stem, four stages of basic
(18/34) or bottleneck (50+, stride on the 3x3 conv, "ResNet v1.5") blocks with 1x1 conv + BN projection
shortcuts where shape changes, global average pooling, a linear classifier ``fc``; kaiming-normal fan-out
conv init, BN weight 1 and bias 0. Parameter counts without ``fc``: ResNet-18 11,176,512, ResNet-50
23,508,032 (torchvision's).
"""
import torch
from torch import nn

_STAGES = {"18": (2, 2, 2, 2), "34": (3, 4, 6, 3), "50": (3, 4, 6, 3), "101": (3, 4, 23, 3)}


def _conv(in_channels, out_channels, kernel, stride=1):
  return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_channels, width, stride):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_channels, width, 3, stride), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = _conv(width, width, 3), nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = _projection(in_channels, width, stride)

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_channels, width, stride):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_channels, width, 1), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
    self.conv3, self.bn3 = _conv(width, width * 4, 1), nn.BatchNorm2d(width * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = _projection(in_channels, width * 4, stride)

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _projection(in_channels, out_channels, stride):
  if stride == 1 and in_channels == out_channels:
    return None
  return nn.Sequential(_conv(in_channels, out_channels, 1, stride), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):

  def __init__(self, variant: str, num_classes: int = 1000):
    super().__init__()
    block = Bottleneck if int(variant) >= 50 else BasicBlock
    self.conv1, self.bn1 = _conv(3, 64, 7, 2), nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    channels = 64
    for i, (blocks, width) in enumerate(zip(_STAGES[variant], (64, 128, 256, 512), strict=True), start=1):
      layers = []
      for j in range(blocks):
        layers.append(block(channels, width, 2 if i > 1 and j == 0 else 1))
        channels = width * block.expansion
      setattr(self, f"layer{i}", nn.Sequential(*layers))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(channels, num_classes)
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(weights=None):
  assert weights is None
  return ResNet("18")


def resnet34(weights=None):
  assert weights is None
  return ResNet("34")


def resnet50(weights=None):
  assert weights is None
  return ResNet("50")
