"""Train the domain classifier (a small CNN) on a dataset's train split and report its test accuracy.

    python train/train_classifier.py --dataset builtin:photos --output_dir classifier

The classifier's penultimate features give a domain FID (``nala-fid --feature_extractor DIR``) and its
predictions the class accuracy of generated images. Saved as safetensors + config.json, with
``metrics.json`` (test accuracy, command) beside them.
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nala_diffusion.data.datasets import load_dataset
from nala_diffusion.metrics.classifier import DomainClassifier
from nala_diffusion.utils.cli_args import exit_on_input_error
from nala_diffusion.utils.files import follow_umask


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="builtin:photos",
                   help="builtin:<name>, or an ImageFolder named train/ with a test/ folder beside it (else give "
                        "--test_data_dir)")
    p.add_argument("--test_data_dir", default=None, help="held-out ImageFolder (builtin datasets have their own)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


@torch.no_grad()
def accuracy(model: DomainClassifier, dataset, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += (model((images + 1) / 2).argmax(-1) == labels).sum().item()
    return correct / len(dataset)


def test_source(args) -> str:
    """Where the held-out images come from: the built-in dataset's test split, --test_data_dir, or the
    test/ twin of a train/ folder. An ImageFolder alone has no held-out images: refused, since its
    own images would report training accuracy as test accuracy."""
    if args.test_data_dir or args.dataset.startswith("builtin:"):
        return args.test_data_dir or args.dataset
    folder = os.path.normpath(args.dataset)
    twin = os.path.join(os.path.dirname(folder), "test")
    if os.path.basename(folder) == "train" and os.path.isdir(twin):
        return twin
    raise ValueError(f"{args.dataset!r} has no held-out images: give --test_data_dir, or name the folder train/ "
                     f"with a test/ folder beside it ({twin!r} does not exist)")


def main(args) -> int:
    torch.manual_seed(args.seed)
    train = load_dataset(args.dataset, args.resolution, split="train")
    test = load_dataset(test_source(args), args.resolution, split="test")
    if list(test.classes) != list(train.classes):
        raise ValueError(f"the test classes {list(test.classes)} differ from the training classes {list(train.classes)}")
    model = DomainClassifier(num_classes=len(train.classes), image_size=args.resolution, widths=args.widths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.epochs * len(loader))
    for epoch in tqdm(range(args.epochs), desc="epochs"):
        model.train()
        for images, labels in loader:
            flip = torch.rand(len(images)) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            loss = F.cross_entropy(model((images + 1) / 2), labels)  # the classifier takes [0, 1] images
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    metrics = {"test_accuracy": accuracy(model, test), "train_accuracy": accuracy(model, train),
               "test_images": len(test), "test_source": test_source(args), "classes": list(train.classes), "command": " ".join(sys.argv)}
    model.save_pretrained(args.output_dir)
    follow_umask(args.output_dir)  # safetensors writes 0o600
    with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    print(f"test accuracy {metrics['test_accuracy']:.4f} ({len(test)} images); saved to {args.output_dir}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return main(parse_args(argv))
    except ValueError as error:
        return exit_on_input_error("train_classifier", error)


if __name__ == "__main__":
    sys.exit(cli())
