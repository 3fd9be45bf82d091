"""A user's own task, unrelated to the example one: random vectors, a two-layer MLP."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class RandomVectors(L.LightningDataModule):
    """``features``-dimensional points labelled by the sign pattern of their first coordinates."""

    def __init__(self, features: int = 8, num_classes: int = 4, size: int = 64) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, features, generator=g)
        self.y = (self.x[:, 0] > 0).long() + 2 * (self.x[:, 1] > 0).long() % num_classes

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


class MLP(L.LightningModule):
    def __init__(self, features: int, num_classes: int, hidden: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
