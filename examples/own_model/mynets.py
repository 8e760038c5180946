"""The user's own network: plain PyTorch, nothing from rapc.

rapc calls the factory as small_cnn(num_classes=..., in_channels=...) with the dataset's figures
(10 classes, 3 channels for an `imagefolder`), plus model.kwargs from the config.
"""

from __future__ import annotations

from torch import nn

# The input statistics the network was trained on: train.py normalizes with them, and config.yaml
# gives rapc the same figures (model.normalize), so rapc puts them in front of the network.
MEAN = (0.1, 0.1, 0.1)
STD = (0.3, 0.3, 0.3)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool blocks and a linear head, for normalized 32x32 images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(in_channels, channels), _block(channels, 2 * channels), _block(2 * channels, 4 * channels))
        self.head = nn.Linear(4 * channels * 4 * 4, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def small_cnn(num_classes: int = 10, in_channels: int = 3, channels: int = 16) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, channels)
