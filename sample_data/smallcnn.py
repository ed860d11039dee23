"""SmallCNN, the architecture of sample_data/model.pt: `bncli recalibrate --model sample_data.smallcnn:small_cnn`."""

import torch.nn as nn

NUM_CLASSES = 4


class SmallCNN(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),   # 0
            nn.BatchNorm2d(16),                           # 1
            nn.ReLU(inplace=True),                        # 2
            nn.MaxPool2d(2),                              # 3
            nn.Conv2d(16, 32, 3, padding=1, bias=False),  # 4
            nn.BatchNorm2d(32),                           # 5
            nn.ReLU(inplace=True),                        # 6
            nn.MaxPool2d(2),                              # 7
            nn.Conv2d(32, 32, 3, padding=1, bias=False),  # 8
            nn.BatchNorm2d(32),                           # 9
            nn.ReLU(inplace=True),                        # 10
            nn.AdaptiveAvgPool2d(1),                      # 11
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


def small_cnn(num_classes=NUM_CLASSES):
    """The factory for --model: an untrained SmallCNN, whose weights recalibrate replaces with the checkpoint's."""
    return SmallCNN(num_classes)
