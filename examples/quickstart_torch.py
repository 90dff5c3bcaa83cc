"""The README's PyTorch quickstart: the article's MCNet, 100 MC-dropout samples in one call."""

import numpy as np
import torch

import mcu


class MCNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 512)
        self.dropout = torch.nn.Dropout(0.5)
        self.fc2 = torch.nn.Linear(512, 10)

    def forward(self, x):
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


if __name__ == "__main__":
    model = MCNet().eval()
    x = np.random.default_rng(0).random((8, 784), dtype=np.float32)
    samples, info = mcu.sample(model, x, n_samples=100, seed=0, return_info=True)
    print(f"samples {samples.shape}; mean std over T: {samples.std(axis=0).mean():.4f}")
    print(f"backend {info.backend} ({info.backend_reason}); strategy {info.strategy}: {info.strategy_reason}")
