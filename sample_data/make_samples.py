"""Rebuild every sample file in sample_data/ (deterministic, fixed seed): run `python sample_data/make_samples.py`."""

import os
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # smallcnn.py beside this script holds the architecture, shared with `bncli recalibrate`

from smallcnn import NUM_CLASSES, SmallCNN  # noqa: E402

SEED = 0
IMG_SIZE = 16
TRAIN_SAMPLES = 1024
BATCH_SIZE = 32
EPOCHS = 8  # 1024 / 32 * 8 = 256 optimizer steps
LR = 0.05

# Per-input-channel offset and scale, so the first BN layer sees clearly non-default statistics.
CHANNEL_MEAN = torch.tensor([2.0, -1.0, 3.0]).view(3, 1, 1)
CHANNEL_STD = torch.tensor([3.0, 0.5, 2.0]).view(3, 1, 1)


def make_data(n, generator):
    """Return (images float32 (n,3,16,16), labels int64 (n,)).

    Class k is a sinusoidal stripe pattern at orientation k*45 degrees with a random
    phase, plus a class-specific blob, Gaussian noise, and a per-channel mean/std.
    """
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    coords = torch.arange(IMG_SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angles = labels.float() * (torch.pi / NUM_CLASSES)  # 0, 45, 90, 135 degrees
    phase = torch.rand(n, generator=generator) * 2 * torch.pi
    proj = (torch.cos(angles).view(n, 1, 1) * xx + torch.sin(angles).view(n, 1, 1) * yy)
    stripes = torch.sin(proj * (2 * torch.pi / 5.0) + phase.view(n, 1, 1))  # (n,16,16)

    # A Gaussian blob in a class-specific quadrant.
    centres = torch.tensor([[4.0, 4.0], [4.0, 11.0], [11.0, 4.0], [11.0, 11.0]])
    cy = centres[labels, 0].view(n, 1, 1)
    cx = centres[labels, 1].view(n, 1, 1)
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)

    # Channels mix stripes and blob with different weights.
    mix = torch.tensor([[1.0, 0.5], [0.6, 1.0], [0.8, -0.7]])  # (3, 2)
    base = torch.stack([stripes, blob], dim=1)  # (n,2,16,16)
    images = torch.einsum("cs,nshw->nchw", mix, base)
    images = images + 0.4 * torch.randn(images.shape, generator=generator)
    images = images * CHANNEL_STD + CHANNEL_MEAN
    return images.float().contiguous(), labels.long()


def build_model():
    torch.manual_seed(SEED)
    return SmallCNN()


def accuracy(model, images, labels):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train(was_training)
    return acc


def train(model, images, labels, generator):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    n = images.shape[0]
    model.train()
    steps = 0
    for _ in range(EPOCHS):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, BATCH_SIZE):
            idx = perm[start:start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(images[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            steps += 1
    model.eval()
    return steps, loss.item()


def clean_state_dict(state_dict, prefix=""):
    return OrderedDict((prefix + k, v.detach().clone().contiguous()) for k, v in state_dict.items())


def save_safetensors(tensors, path):
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates files 0600; match torch.save / np.save


def inject_defects(state_dict):
    """Return (defective copy of state_dict, list of changed keys)."""
    sd = clean_state_dict(state_dict)
    changed = []

    # features.1: never updated (default running stats, no batches tracked).
    sd["features.1.running_mean"].fill_(0.0)
    sd["features.1.running_var"].fill_(1.0)
    sd["features.1.num_batches_tracked"].fill_(0)
    changed += ["features.1.running_mean (all 0.0)",
                "features.1.running_var (all 1.0)",
                "features.1.num_batches_tracked (0)"]

    # features.5: NaN variance and collapsed variances below eps (1e-5).
    sd["features.5.running_var"][3] = float("nan")
    sd["features.5.running_var"][[7, 11]] = 1e-8
    changed += ["features.5.running_var[3] = nan",
                "features.5.running_var[7, 11] = 1e-8"]

    # features.9: dead gamma channels and a negative variance.
    sd["features.9.weight"][[0, 2, 5]] = 1e-5
    sd["features.9.running_var"][4] = -0.5
    changed += ["features.9.weight[0, 2, 5] = 1e-5",
                "features.9.running_var[4] = -0.5"]
    return sd, changed


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    train_x, train_y = make_data(TRAIN_SAMPLES, gen)
    model = build_model()
    print(f"chance accuracy: {1 / NUM_CLASSES:.3f}; before training: "
          f"{accuracy(model, train_x, train_y):.3f}")
    steps, last_loss = train(model, train_x, train_y, gen)
    print(f"trained {steps} steps, last batch loss {last_loss:.4f}")
    print(f"final train accuracy (eval mode): {accuracy(model, train_x, train_y):.3f}")

    state = clean_state_dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            print(f"BN layer {name}: {module.num_features} channels, "
                  f"num_batches_tracked={int(module.num_batches_tracked)}")

    out = lambda fname: os.path.join(HERE, fname)  # noqa: E731

    torch.save({"state_dict": clean_state_dict(state, prefix="module."),
                "epoch": EPOCHS,
                "arch": "SmallCNN"}, out("model.pt"))
    save_safetensors(clean_state_dict(state), out("model.safetensors"))

    defects, changed = inject_defects(state)
    print("injected defects:")
    for c in changed:
        print(f"  {c}")
    torch.save(defects, out("model_defects.pt"))
    save_safetensors(clean_state_dict(defects), out("model_defects.safetensors"))

    x, y = make_data(8, torch.Generator().manual_seed(SEED + 1))
    torch.save(x.clone().contiguous(), out("input.pt"))
    torch.save(x.permute(0, 2, 3, 1).contiguous(), out("input_nhwc.pt"))
    save_safetensors({"images": x.clone().contiguous(), "labels": y.clone().contiguous()},
                     out("inputs.safetensors"))
    np.save(out("input.npy"), x.numpy().astype(np.float32))
    # What features.1 (the first BatchNorm) really sees: the first conv's output on the sample input,
    # so `bncli normalize activations.pt --checkpoint model.pt --layer features.1` compares train and eval.
    with torch.no_grad():
        acts = model.features[0](x).contiguous()
    torch.save(acts, out("activations.pt"))
    print(f"activations for features.1: {tuple(acts.shape)}")
    print(f"sample input: {tuple(x.shape)} {x.dtype}, labels {y.tolist()}")
    print(f"wrote sample files to {HERE}")


if __name__ == "__main__":
    main()
