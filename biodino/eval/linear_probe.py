"""A linear probe on frozen embeddings: multinomial logistic regression with L2 regularization, fitted full-batch
by L-BFGS in torch (on the GPU when the embeddings are there), on features standardized by the train set."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                         l2: float = 1e-4, max_iter: int = 500, seed: int = 0) -> torch.Tensor:
    """Predicted class per test row. ``l2`` weighs ``|W|^2 / 2`` against the mean cross-entropy (scikit-learn's
    ``C`` is ``1 / (l2 * n_train)``)."""
    torch.manual_seed(seed)
    mean, std = train.float().mean(dim=0), train.float().std(dim=0).clamp_min(1e-6)
    x, xt = (train.float() - mean) / std, (test.float() - mean) / std
    y = train_labels.long().to(x.device)
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xt @ weight + bias).argmax(dim=1)
