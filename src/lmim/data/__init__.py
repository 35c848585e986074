"""Data: DataModules (ImageFolder, LitData shards, Fashion-MNIST, the embedded demo photos, one
device-resident batch for benchmarks),
transforms and the fast crop-before-decode pipeline."""

from lmim.data.datamodules import (
    DemoDataModule,
    ImageFolderDataModule,
    ResidentDataModule,
    load_demo_images,
)
from lmim.data.fashion_mnist import FashionMNISTDataModule
from lmim.data.shards import ShardsDataModule
from lmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, pretrain_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DemoDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ResidentDataModule",
    "ShardsDataModule",
    "denormalize",
    "load_demo_images",
    "pretrain_transform",
]
