"""Data: DataModules (ImageFolder and the embedded demo photos) and transforms."""

from lmim.data.datamodules import DemoDataModule, ImageFolderDataModule, load_demo_images
from lmim.data.fashion_mnist import FashionMNISTDataModule
from lmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, pretrain_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DemoDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "denormalize",
    "load_demo_images",
    "pretrain_transform",
]
