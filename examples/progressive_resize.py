"""Progressive resizing on generated images: small images first, full size at the end.

    python examples/progressive_resize.py             # plain vs progressive, minutes on 2 cores
    python examples/progressive_resize.py --steps 20  # a smoke run

The images are made here (no download): 32x32 RGB pictures of one of four shapes (disc,
square, horizontal bar, vertical bar) at a random place, size and colour on a noisy
background; the label is the shape. A small CNN with global average pooling classifies them
at any size. The same loop runs twice, once at full size throughout and once with
``ProgressiveResize`` (half size first, full size from 60% of the steps), and prints each
run's training time and accuracy on held-out images at full size.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from stoker.data import ProgressiveResize

SIDE = 32
CLASSES = ("disc", "square", "horizontal bar", "vertical bar")


def make_images(n: int, *, seed: int, side: int = SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images [n, 3, side, side] in [0, 1] and their labels [n] (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # [S, S]
    cy, cx = torch.randint(side // 4, side - side // 4, (2, n, 1, 1), generator=g).float()
    r = torch.randint(side // 8, side // 4 + 1, (n, 1, 1), generator=g).float()
    dy, dx = (ys - cy).abs(), (xs - cx).abs()  # [n, S, S]
    masks = torch.stack(
        [
            dy**2 + dx**2 <= r**2,  # disc
            (dy <= r * 0.8) & (dx <= r * 0.8),  # square
            (dy <= r * 0.3) & (dx <= r * 1.4),  # horizontal bar
            (dy <= r * 1.4) & (dx <= r * 0.3),  # vertical bar
        ]
    )[labels, torch.arange(n)]  # [n, S, S]
    colour = torch.rand(n, 3, 1, 1, generator=g) * 0.7 + 0.3
    images = torch.rand(n, 3, side, side, generator=g) * 0.3
    return torch.where(masks[:, None], colour, images), labels


def make_model() -> nn.Module:
    """Three conv blocks and global average pooling: any input side >= 8 works."""

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(3, 16),
        nn.MaxPool2d(2),
        block(16, 32),
        nn.MaxPool2d(2),
        block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, len(CLASSES)),
    )


def train(
    steps: int, batch_size: int, resize: ProgressiveResize | None, seed: int
) -> dict[str, float]:
    torch.manual_seed(seed)
    images, labels = make_images(steps * batch_size, seed=seed)
    test_images, test_labels = make_images(512, seed=10_000 + seed)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    started = time.perf_counter()
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        x, y = images[batch], labels[batch]
        if resize is not None:
            x = resize(x, step)  # [B, 3, s, s] with s = resize.size(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    return {"seconds": seconds, "accuracy": accuracy}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-fraction", type=float, default=0.6, help="steps at reduced size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    resize = ProgressiveResize(
        final_size=SIDE, start_size=SIDE // 2, warmup_steps=int(args.warmup_fraction * args.steps)
    )
    results = {
        "full size": train(args.steps, args.batch_size, None, args.seed),
        "progressive": train(args.steps, args.batch_size, resize, args.seed),
    }
    print(f"sides used by the progressive run: {resize.sizes()}")
    for name, r in results.items():
        print(f"{name:>12}: {r['seconds']:6.1f} s training, test accuracy {r['accuracy']:.1%}")
    return results


if __name__ == "__main__":
    main()
