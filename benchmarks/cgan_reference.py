"""A plain-PyTorch CGAN on MNIST, written from the resolved specs/cgan*.yaml: the way to tell a
genspec loop bug from a reading of the paper (issue 20).

Start from a configuration known to train conditional GANs on MNIST (`--preset base`: batch 64,
Adam 2e-4 / beta1 0.5 for both, batch norm in the generator, none in the discriminator, a
two-step upsampler, default init, the label into the discriminator through a linear layer) and
move towards the coursework's text one change at a time (`--set d_norm=vbn`), or start from the
paper's reading (`--preset paper`, what specs/cgan_mbl/noise.yaml resolves to, without the
balancing) and move back. Prints, every --every steps, the losses, the IS of --samples samples
in 10 splits by the genspec MNIST classifier run (the ledger's protocol, on fewer samples) and
the label agreement (share of samples the classifier gives the label asked for).

    python benchmarks/cgan_reference.py --preset paper --steps 900
    python benchmarks/cgan_reference.py --preset base --set d_norm=vbn --steps 900
    python benchmarks/cgan_reference.py --preset paper --set g_norm=bn --steps 600 --every 150

Besides the presets' options, `input_noise=S` adds N(0, S^2) to every image the discriminator
sees (instance noise), `upsample=resize` is nearest x4 then a 5x5 convolution, and
`d_dropout=P` puts dropout after each of the discriminator's convolutions (Question 1's DCGAN
discriminator has 30%). One thread does about 0.7 steps a second at batch 256.

Needs MNIST under $GENSPEC_DATA (../shared/data here) and a finished reports/mnist_classifier.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    # known to train: DCGAN-style conditional GAN as in common MNIST tutorials
    "base": dict(batch=64, lr_d=2e-4, lr_g=2e-4, beta1=0.5, g_norm="bn", d_norm="none", upsample="two_step",
                 init="default", d_label="fc", noise=0.0, smooth=1.0, input_noise=0.0, d_dropout=0.0),
    # the resolved specs/cgan_mbl/noise.yaml (TTUR, VBN in both, Xavier, label maps, x4 deconv,
    # one-sided smoothing 0.9, 10% noise on the discriminator's outputs)
    "paper": dict(batch=256, lr_d=4e-4, lr_g=1e-4, beta1=0.9, g_norm="vbn", d_norm="vbn", upsample="x4",
                  init="xavier", d_label="maps", noise=0.1, smooth=0.9, input_noise=0.0, d_dropout=0.0),
}
REFERENCE = 64  # virtual batch norm's reference batch, as genspec's REFERENCE_BATCH


class VBN(nn.Module):
    """Virtual batch norm, the same arithmetic as genspec.compiler.layers.VirtualBatchNorm: the first
    `reference` examples of the batch are the reference, each example is normalised with their
    statistics plus its own (weight 1 / (reference + 1))."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, h):
        spatial = h.dim() == 4
        per = (lambda t: t.mean((2, 3))) if spatial else (lambda t: t)
        mean_x, sq_x = per(h), per(h * h)
        w = 1.0 / (REFERENCE + 1)
        mean = (1 - w) * mean_x[:REFERENCE].mean(0) + w * mean_x
        var = ((1 - w) * sq_x[:REFERENCE].mean(0) + w * sq_x - mean * mean).clamp_min(0)
        shape = (-1, h.shape[1], 1, 1) if spatial else (-1, h.shape[1])
        weight, bias = self.weight.view(1, *shape[1:]), self.bias.view(1, *shape[1:])
        return weight * (h - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) + bias


def norm(kind: str, channels: int) -> nn.Module:
    return {"bn": lambda: nn.BatchNorm1d(channels), "vbn": lambda: VBN(channels), "none": nn.Identity}[kind]()


def norm2d(kind: str, channels: int) -> nn.Module:
    return {"bn": lambda: nn.BatchNorm2d(channels), "vbn": lambda: VBN(channels), "none": nn.Identity}[kind]()


class Generator(nn.Module):
    """concat(z, label) -> fc 1024 -> fc 7x7x128 -> x4 deconv to 28x28x1 (sigmoid), or two x2 steps."""

    def __init__(self, o: dict):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(110, 1024), norm(o["g_norm"], 1024), nn.ReLU(),
                                nn.Linear(1024, 7 * 7 * 128), norm(o["g_norm"], 7 * 7 * 128), nn.ReLU())
        if o["upsample"] == "x4":  # deconv 1 5x5 x4: 7 -> 28
            self.up = nn.ConvTranspose2d(128, 1, 5, stride=4, padding=1, output_padding=1)
        elif o["upsample"] == "resize":  # nearest x4 then one 5x5 convolution (no checkerboard)
            self.up = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(128, 1, 5, padding=2))
        elif o["upsample"] == "two_step":
            self.up = nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1), norm2d(o["g_norm"], 64), nn.ReLU(),
                                    nn.ConvTranspose2d(64, 1, 4, 2, 1))
        else:  # a misspelt reading must not quietly run another one
            raise SystemExit(f"unknown upsample {o['upsample']!r}; options: x4, resize, two_step")

    def forward(self, z, label):
        h = self.fc(torch.cat([z, label], 1)).view(-1, 128, 7, 7)
        return torch.sigmoid(self.up(h))


class Discriminator(nn.Module):
    """conv 64 5x5 /2 -> conv 128 5x5 /2 -> fc 1 (logit); the label as 10 constant 28x28 maps
    beside the image (the specs' `concat label`), or through a linear layer beside the features."""

    def __init__(self, o: dict):
        super().__init__()
        self.maps = o["d_label"] == "maps"
        drop = o["d_dropout"]  # Question 1's DCGAN discriminator has 30% dropout after each convolution
        self.conv = nn.Sequential(nn.Conv2d(11 if self.maps else 1, 64, 5, 2, 2), norm2d(o["d_norm"], 64),
                                  nn.LeakyReLU(0.2), nn.Dropout(drop), nn.Conv2d(64, 128, 5, 2, 2),
                                  norm2d(o["d_norm"], 128), nn.LeakyReLU(0.2), nn.Dropout(drop), nn.Flatten())
        self.label = None if self.maps else nn.Linear(10, 7 * 7 * 128)
        self.out = nn.Linear(7 * 7 * 128, 1)

    def forward(self, x, label):
        if self.maps:
            return self.out(self.conv(torch.cat([x, label[:, :, None, None].expand(-1, -1, 28, 28)], 1)))
        return self.out(F.leaky_relu(self.conv(x) + self.label(label), 0.2))


def with_reference(net, reference, x, label):
    """Run the reference batch in front of the batch (virtual batch norm), then drop it."""
    if reference is None:
        return net(x, label)
    return net(torch.cat([reference[0], x]), torch.cat([reference[1], label]))[len(reference[0]):]


def inception_score(logp: torch.Tensor, splits: int = 10) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over splits (Salimans et al.)."""
    scores = []
    for part in logp.chunk(splits):
        p_y = part.exp().mean(0, keepdim=True)
        scores.append(math.exp((part.exp() * (part - p_y.log())).sum(1).mean().item()))
    return sum(scores) / len(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="paper")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"change one option: {sorted(PRESETS['base'])}")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", default=str(Path(__file__).resolve().parent.parent / "reports" / "mnist_classifier"))
    args = p.parse_args()
    o = dict(PRESETS[args.preset])
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in o:
            raise SystemExit(f"unknown option {key}; options: {sorted(o)}")
        o[key] = type(o[key])(value) if not isinstance(o[key], str) else value
    print("reading:", ", ".join(f"{k}={v}" for k, v in o.items()), flush=True)

    import torchvision
    import genspec

    torch.manual_seed(args.seed)
    data = torchvision.datasets.MNIST(os.environ.get("GENSPEC_DATA", "../shared/data"), train=True, download=False)
    images = data.data.float().div(255).unsqueeze(1)
    labels = F.one_hot(data.targets, 10).float()
    classifier = genspec.load_run(args.classifier).networks["classifier"]

    gen, dis = Generator(o), Discriminator(o)
    if o["init"] == "xavier":
        for m in [*gen.modules(), *dis.modules()]:
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    opt_d = torch.optim.Adam(dis.parameters(), o["lr_d"], betas=(o["beta1"], 0.999))
    opt_g = torch.optim.Adam(gen.parameters(), o["lr_g"], betas=(o["beta1"], 0.999))
    rows = torch.randperm(len(images))[:REFERENCE]
    ref_d = (images[rows], labels[rows]) if o["d_norm"] == "vbn" else None
    ref_g = (torch.randn(REFERENCE, 100), F.one_hot(torch.randint(0, 10, (REFERENCE,)), 10).float()) \
        if o["g_norm"] == "vbn" else None

    def noisy(prob):  # (1 - a) p + a u, as genspec's noisy()
        return (1 - o["noise"]) * prob + o["noise"] * torch.rand_like(prob) if o["noise"] else prob

    order, position, began = torch.randperm(len(images)), 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        if position + o["batch"] > len(images):
            order, position = torch.randperm(len(images)), 0
        batch = order[position:position + o["batch"]]
        position += o["batch"]
        x, y = images[batch], labels[batch]
        z, c = torch.randn(len(x), 100), F.one_hot(torch.randint(0, 10, (len(x),)), 10).float()
        fake = with_reference(gen, ref_g, z, c)
        if o["input_noise"]:  # instance noise: N(0, s^2) added to every image the discriminator sees
            x, fake = x + o["input_noise"] * torch.randn_like(x), fake + o["input_noise"] * torch.randn_like(fake)
        # the discriminator's step, then the generator's on the same batch (batch: same)
        d_real = torch.sigmoid(with_reference(dis, ref_d, x, y))
        d_fake = torch.sigmoid(with_reference(dis, ref_d, fake.detach(), c))
        d_loss = F.binary_cross_entropy(noisy(d_real), torch.full_like(d_real, o["smooth"])) + \
            F.binary_cross_entropy(noisy(d_fake), torch.zeros_like(d_fake))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_logit = with_reference(dis, ref_d, fake, c)
        g_loss = F.binary_cross_entropy_with_logits(g_logit, torch.ones_like(g_logit))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        if step % args.every == 0 or step == args.steps:
            gen.eval()
            with torch.no_grad():
                asked = torch.arange(args.samples) % 10
                parts = [with_reference(gen, ref_g, torch.randn(len(a), 100), F.one_hot(a, 10).float())
                         for a in asked.split(500)]
                logp = classifier(torch.cat(parts))
            gen.train()
            agreement = (logp.argmax(1) == asked).float().mean().item()
            print(f"step {step}: d_loss {d_loss.item():.3f} g_loss {g_loss.item():.3f} IS {inception_score(logp):.3f} "
                  f"label agreement {agreement:.2f} ({time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
