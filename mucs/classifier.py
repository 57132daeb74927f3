"""A small classifier trained on a dataset's training split; its penultimate features give the `feat`
similarity of eval (a stand-in for DINO/CLIP where no pretrained network fits, e.g. 8x8 digits)."""
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F_

from mucs.io import load_tensors, save_tensors


class SmallCNN(nn.Module):
    def __init__(self, channels, num_classes, width=64, feat_dim=128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, feat_dim), nn.GELU())
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(split, num_classes, epochs=30, batch=128, seed=0):
    torch.manual_seed(seed)
    net = SmallCNN(split.images.shape[1], num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    x, y = split.float_images(), split.labels
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i: i + batch]
            loss = F_.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def load_or_train(data_folder, cache_dir, name):
    """The cached classifier of a dataset (trained once, on its training split)."""
    from mucs.data import load_meta, load_split

    meta = load_meta(data_folder)
    path = Path(cache_dir) / f"{name}-classifier.safetensors"
    net = SmallCNN(meta["channels"], max(2, meta["num_classes"]))
    if path.exists():
        net.load_state_dict(load_tensors(path, what="feature classifier", hint="delete it to retrain"))
        return net.eval()
    train = load_split(data_folder, "train")
    test = load_split(data_folder, "test")
    net = train_classifier(train, max(2, meta["num_classes"]))
    with torch.no_grad():
        acc = (net(test.float_images()).argmax(1) == test.labels).float().mean().item()
    save_tensors(path, net.state_dict(), metadata=dict(test_accuracy=acc))
    print(f"[eval] trained the {name} feature classifier (test accuracy {acc:.3f}) -> {path}")
    return net
