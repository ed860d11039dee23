"""Small models for `recalibrate --model models_for_tests:FACTORY` in tests (tests/ is on sys.path under pytest)."""

import torch
import torch.nn as nn

# A fixed 1x1 convolution: the BatchNorm input is exactly W @ x + b per pixel, so its statistics have a closed form.
POINTWISE_WEIGHT = [[1.0, -2.0, 0.5], [0.25, 0.0, 3.0], [-1.5, 1.0, 1.0], [2.0, 0.5, -0.75]]
POINTWISE_BIAS = [0.5, -1.0, 2.0, 0.0]


def pointwise():
    """Conv2d(3, 4, 1) with the fixed weights above, then BatchNorm2d(4)."""
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(POINTWISE_WEIGHT).view(4, 3, 1, 1))
        conv.bias.copy_(torch.tensor(POINTWISE_BIAS))
    return nn.Sequential(conv, nn.BatchNorm2d(4))


class Deep(nn.Module):
    """Three conv + BatchNorm2d blocks with dropout between them, and a BatchNorm1d on the pooled features."""

    def __init__(self, width=8, num_classes=5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout2d(0.5),  # must be off (eval mode) during recalibration
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, momentum=None),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(6, num_classes), nn.BatchNorm1d(num_classes), nn.Dropout(0.3))

    def forward(self, x):
        return self.head(self.body(x))


def deep(width=8, num_classes=5, seed=0):
    torch.manual_seed(seed)
    return Deep(width, num_classes)
