"""convlens's callbacks in your own Lightning project: a torchvision ResNet-18 on CIFAR-10.

Nothing here is convlens except the three marked lines: an ordinary LightningModule around
`torchvision.models.resnet18(num_classes=10)`, plain `DataLoader`s over an image folder
(`$DATA_DIR/cifar10-jpg/{train,test}/<class>/*.jpg`, DATA_DIR defaults to ./data) or, offline,
torchvision's `FakeData`, and a `TensorBoardLogger`. The callbacks find what they need on their own:
probe images (one per class) from the validation loader, the display normalization from the
`Normalize` in its transforms, class names from the dataset's `classes`, layers from the model
(`model.conv1`, `model.layer1.1.conv2`, ... as `print(model)` names them).

The validation images are put in a seeded class-balanced order (the image folder is sorted by
class), so a validation limited to its first batches (`--limit-val-batches`) measures every class.
Each epoch's metrics are printed when it ends.

    python examples/resnet_cifar10.py --max-epochs 5                   # CIFAR-10 from $DATA_DIR
    python examples/resnet_cifar10.py --fake --limit-train-batches 20  # offline
    tensorboard --logdir runs
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from convlens.callbacks import DecodedFilters, DeconvProjection, FilterEvolution, OcclusionSensitivity  # convlens 1/3

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class LitResNet(pl.LightningModule):
    """A user's own module: the network is `self.model`; `forward` returns the class scores."""

    def __init__(self, lr: float = 0.05, num_classes: int = 10):
        super().__init__()
        self.save_hyperparameters()
        self.model = torchvision.models.resnet18(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)


def datasets(data_dir: str | os.PathLike | None = None, fake: bool = False, image_size: int = 32,
             fake_size: int = 512):
    """(train, val) datasets: the CIFAR-10 image folder when it is there (and `fake` is off), else
    torchvision's FakeData of the same shape."""
    normalize = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = T.Compose([T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.ToTensor(), normalize])
    root = Path(data_dir if data_dir is not None else os.environ.get("DATA_DIR", "./data")) / "cifar10-jpg"
    if not fake and (root / "train").is_dir() and (root / "test").is_dir():
        return (torchvision.datasets.ImageFolder(root / "train", train_tf),
                torchvision.datasets.ImageFolder(root / "test", val_tf))
    if not fake:
        print(f"{root} not found: using FakeData (pass --fake to silence this)")
    shape = (3, image_size, image_size)
    return (torchvision.datasets.FakeData(fake_size, shape, 10, train_tf, random_offset=0),
            torchvision.datasets.FakeData(fake_size // 4, shape, 10, val_tf, random_offset=fake_size))


class PrintMetrics(pl.Callback):
    """Prints each epoch's logged metrics when it ends (train loss and accuracy, validation loss and
    accuracy: validation runs before the training epoch ends)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if not k.endswith("_step") and getattr(v, "numel", lambda: 1)() == 1}
        shown = ", ".join(f"{k.removesuffix('_epoch')} {v:.4f}" for k, v in sorted(metrics.items()))
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {shown}", flush=True)


def class_balanced_order(labels, seed: int = 0) -> list[int]:
    """The indices of `labels` with each class shuffled (seeded), then dealt out one class after
    another: every prefix of the order holds the classes as evenly as it can, so the first
    `ceil(classes / batch_size)` batches of a loader over it see every class."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    per_class = [idx[torch.randperm(len(idx), generator=g)]
                 for idx in ((labels == c).nonzero().flatten() for c in labels.unique())]
    rounds = max(len(idx) for idx in per_class)
    return [int(idx[i]) for i in range(rounds) for idx in per_class if i < len(idx)]


def labels_of(dataset: Dataset) -> list[int]:
    """The class of every item: an ImageFolder's `targets`, else read item by item (FakeData)."""
    targets = getattr(dataset, "targets", None)
    return list(targets) if targets is not None else [int(dataset[i][1]) for i in range(len(dataset))]


def val_loader(val_set: Dataset, batch_size: int, **loader) -> DataLoader:
    """The validation loader, in a fixed class-balanced order (see `class_balanced_order`)."""
    return DataLoader(Subset(val_set, class_balanced_order(labels_of(val_set))), batch_size=batch_size,
                      shuffle=False, **loader)


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder holding cifar10-jpg/ (default: $DATA_DIR or ./data)")
    parser.add_argument("--fake", action="store_true", help="torchvision FakeData instead of CIFAR-10")
    parser.add_argument("--out", default="runs", help="TensorBoard log folder")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--limit-val-batches", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-viz", action="store_true", help="train without the convlens callbacks")
    args = parser.parse_args(argv)

    pl.seed_everything(0, workers=True)
    train_set, val_set = datasets(args.data_dir, args.fake)
    loader = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_set, shuffle=True, **loader)
    val = val_loader(val_set, **loader)

    callbacks = [DeconvProjection(), FilterEvolution(), DecodedFilters(), OcclusionSensitivity()]  # convlens 2/3
    trainer = pl.Trainer(max_epochs=args.max_epochs, accelerator="auto", devices=1,
                         limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
                         logger=TensorBoardLogger(args.out, name="resnet18_cifar10"),
                         callbacks=([] if args.no_viz else callbacks) + [PrintMetrics()],  # convlens 3/3
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(LitResNet(), train_loader, val)
    return trainer


if __name__ == "__main__":
    main()
