"""An MLP probe on frozen embeddings for multi-label traits (the model cards' AwA2 / FishNet protocol): Linear ->
Dropout -> Linear with no activation between, trained on 0/1 targets with binary cross-entropy by Adam under a
step-decayed learning rate, on the device of the embeddings. Initialization, shuffling and dropout draw from the
probe's own generators, so a seed gives the same probe every time and the global RNG is left alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layer(fan_in: int, fan_out: int, gen: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """Weight and bias drawn uniformly in +-1/sqrt(fan_in), as torch's nn.Linear initializes them."""
    bound = fan_in ** -0.5
    drawn = [(torch.rand(shape, generator=gen) * 2 - 1) * bound for shape in ((fan_out, fan_in), (fan_out,))]
    return [t.to(device).requires_grad_() for t in drawn]


def _dropout(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Inverted dropout with masks from ``gen`` (nn.Dropout would draw from the global RNG)."""
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return x * keep / (1.0 - p)


def mlp_probe_predict(train: torch.Tensor, targets: torch.Tensor, test: torch.Tensor, epochs: int = 100,
                      batch_size: int = 128, seed: int = 0, lr: float = 1e-4, hidden: int = 512,
                      dropout: float = 0.5, step_size: int = 20, gamma: float = 0.5) -> torch.Tensor:
    """0/1 predictions (n_test, traits) for 0/1 ``targets`` (n_train, traits): sigmoid of the logits above 0.5."""
    device = train.device
    host = torch.Generator().manual_seed(seed)  # init and shuffle, drawn on the CPU so every device agrees
    masks = torch.Generator(device=device).manual_seed(seed)
    x, y = train.float(), targets.float().to(device)
    w1, b1 = _layer(x.shape[1], hidden, host, device)
    w2, b2 = _layer(hidden, y.shape[1], host, device)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=lr)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=host).to(device).split(batch_size):
            logits = F.linear(_dropout(F.linear(x[rows], w1, b1), dropout, masks), w2, b2)
            loss = F.binary_cross_entropy_with_logits(logits, y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(F.linear(F.linear(chunk.float(), w1, b1), w2, b2)) > 0.5
                          for chunk in test.split(4096)]).long()
