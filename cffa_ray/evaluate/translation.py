"""The utility check's model: a small CF -> FA translation network, trained and scored (torch, no Ray).

A few-level convolutional UNet (LEVELS resolutions, WIDTH channels at the top, doubling per level),
trained with a fixed seed for a fixed number of steps on THUMB_SIZE px pairs: L1 between predicted
and true FA in [-1, 1], Adam, batches drawn with replacement, random horizontal and vertical flips
(the same for both images of a pair). What it learns to predict depends only on the training pairs:
the same budget and seed on two sets of pairs compares the sets.

Scores on held-out pairs (uint8 images): PSNR and SSIM of the predicted FA against the true FA, and
the vessel soft Dice between their vessel maps (vessels.py, inside the pair's fundus) - whether the
predicted angiogram puts its vessels where the photograph has them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cffa_ray.evaluate import metrics
from cffa_ray.evaluate.vessels import fa_vessels, pair_masks, soft_dice

LEVELS, WIDTH = 3, 16
BATCH, LR = 16, 2e-3
SCORES = ("psnr", "ssim", "dice")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU())


class TinyUNet(nn.Module):
    """CF [B, 3, S, S] in [-1, 1] -> FA [B, 1, S, S] in [-1, 1]; S divisible by 2^(LEVELS-1)."""

    def __init__(self, levels: int = LEVELS, width: int = WIDTH):
        super().__init__()
        chans = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList([_block(3, chans[0])] + [_block(a, b) for a, b in zip(chans, chans[1:])])
        self.up = nn.ModuleList([_block(b + a, a) for a, b in zip(chans[:-1], chans[1:])][::-1])
        self.out = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.avg_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, skips.pop()], dim=1))
        return torch.tanh(self.out(x))


def to_tensors(cf: np.ndarray, fa: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 CF [N, S, S, 3], FA [N, S, S] -> float32 [N, 3, S, S], [N, 1, S, S] in [-1, 1]."""
    x = torch.tensor(cf).permute(0, 3, 1, 2).float() / 127.5 - 1  # a copy: Ray hands over read-only arrays
    y = torch.tensor(fa)[:, None].float() / 127.5 - 1
    return x, y


def train_translation(cf: np.ndarray, fa: np.ndarray, steps: int, seed: int, device: str = "cpu") -> TinyUNet:
    """Train a TinyUNet on pairs (uint8 CF [N, S, S, 3], FA [N, S, S]) for `steps` steps from `seed`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TinyUNet().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    x_all, y_all = to_tensors(cf, fa)
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x_all), BATCH))
        x, y = x_all[idx], y_all[idx]
        for dim, flip in ((3, rng.random(BATCH) < 0.5), (2, rng.random(BATCH) < 0.5)):
            f = torch.from_numpy(flip)
            x[f], y[f] = x[f].flip(dim), y[f].flip(dim)
        loss = (model(x.to(device)) - y.to(device)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: TinyUNet, cf: np.ndarray, device: str = "cpu", chunk: int = 64) -> np.ndarray:
    """uint8 CF [N, S, S, 3] -> predicted uint8 FA [N, S, S]."""
    out = []
    for s in range(0, len(cf), chunk):
        x = torch.tensor(cf[s:s + chunk]).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
        out.append(((model(x)[:, 0].cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, *cf.shape[1:3]), np.uint8)


def score_predictions(pred_fa: np.ndarray, cf: np.ndarray, fa: np.ndarray) -> dict[str, list[float]]:
    """Per held-out pair {psnr, ssim, dice}: predicted FA [N, S, S] vs true FA [N, S, S] (vessel maps inside
    the fundus that the true CF and FA share; NaN when there is none)."""
    out = {k: [] for k in SCORES}
    for p, c, f in zip(pred_fa, cf, fa):
        mask = pair_masks(c, f)
        out["psnr"].append(metrics.psnr(p, f))
        out["ssim"].append(metrics.ssim(p, f))
        out["dice"].append(soft_dice(fa_vessels(p, mask), fa_vessels(f, mask), mask) if mask.any() else float("nan"))
    return out
