"""pytorchexample: the model, the data and the training and test loops.

The shape of Flower's quickstart-pytorch task (3x32x32 images, 10 labels, a
small CNN trained with torch SGD), on data that needs no download:
scikit-learn's digits, upsampled from 8x8 to 32x32 and repeated over three
channels. A fixed share is the server's test set; the rest is split among the
clients with flwr-datasets' ``IidPartitioner``, and each client keeps 20% of its
partition to evaluate on, as the quickstart does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from datasets import Array3D, ClassLabel, Dataset, Features
from flwr_datasets.partitioner import IidPartitioner
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

DATA_SEED = 0  # the same images, split and partitions for every run: seeds vary the model and the batches
CENTRAL_TEST_ROWS = 297  # of the 1797 digits; the other 1500 go to the clients
IMAGE = (3, 32, 32)


class Net(nn.Module):
    """Two 5x5 convolutions with max-pooling, then three linear layers (62,006 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@lru_cache(maxsize=1)
def _digits() -> tuple[Dataset, Dataset]:
    """(the clients' pool, the server's test set), as 3x32x32 images scaled to [-1, 1]."""
    pixels, labels = load_digits(return_X_y=True)
    small = torch.tensor(pixels / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    images = nn.functional.interpolate(small, size=IMAGE[1:], mode="bilinear", align_corners=False)
    images = (images.repeat(1, IMAGE[0], 1, 1) - 0.5) / 0.5  # the quickstart's Normalize((0.5,) * 3, (0.5,) * 3)
    features = Features({"img": Array3D(shape=IMAGE, dtype="float32"), "label": ClassLabel(num_classes=10)})
    data = Dataset.from_dict({"img": images.numpy(), "label": labels}, features=features)
    order = np.random.default_rng(DATA_SEED).permutation(len(data))
    return data.select(order[CENTRAL_TEST_ROWS:]), data.select(order[:CENTRAL_TEST_ROWS])


@lru_cache(maxsize=4)
def _partitioner(num_partitions: int) -> IidPartitioner:
    """The clients' pool split IID into ``num_partitions`` equal parts (one per process and size: cached)."""
    pool, _ = _digits()
    # Every partition gets the same number of rows (the remainder, fewer than
    # num_partitions, is left out): FedAvg weights clients by num-examples and
    # Clip21's server by 1/n, and with equal partitions they are the same mean.
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = pool.select(range(num_partitions * (len(pool) // num_partitions)))
    return partitioner


def load_data(
    partition_id: int, num_partitions: int, batch_size: int, shuffle_seed: Sequence[int] = ()
) -> tuple[DataLoader, DataLoader]:
    """The train and test loaders of one client's partition (80% / 20%).

    ``shuffle_seed`` (with the partition id, so that clients differ) orders the training batches.
    """
    partition = _partitioner(num_partitions).load_partition(partition_id)
    split = partition.train_test_split(test_size=0.2, seed=42).with_format("torch")
    state = np.random.SeedSequence([*shuffle_seed, partition_id]).generate_state(1, dtype=np.uint64)[0]
    shuffle = torch.Generator().manual_seed(int(state))
    trainloader = DataLoader(split["train"], batch_size=batch_size, shuffle=True, generator=shuffle)
    return trainloader, DataLoader(split["test"], batch_size=batch_size)


def load_centralized_dataset() -> DataLoader:
    """The server's test set (digits no client holds)."""
    return DataLoader(_digits()[1].with_format("torch"), batch_size=128)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float) -> float:
    """Train ``net`` in place with SGD (momentum 0.9); returns the mean loss over the batches."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for batch in trainloader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(batch["img"]), batch["label"])
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    return total / batches


def test(net: nn.Module, testloader: DataLoader) -> tuple[float, float]:
    """(mean loss over the batches, accuracy) of ``net`` on ``testloader``."""
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for batch in testloader:
            logits = net(batch["img"])
            loss += nn.functional.cross_entropy(logits, batch["label"]).item()
            correct += int((logits.argmax(dim=1) == batch["label"]).sum())
    return loss / len(testloader), correct / len(testloader.dataset)
