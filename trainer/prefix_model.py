"""The trainable prefix, reparameterised as in the paper (§4.3).

For each target (GPT-2: `decoder`; BART: `encoder`, `decoder`, `cross`) a small matrix P' [P, k] goes through
its own MLP  Linear(k, mid) -> Tanh -> Linear(mid, num_layers * 2 * hidden)  and is viewed as the per-layer
keys and values `[num_layers, 2, kv_heads, P, head_dim]` (kv_heads: the key/value heads, fewer than the query
heads under grouped-query attention). Only the MLP's output is exported; P' and the MLP
are thrown away (`PrefixTuner.export`).
"""

from __future__ import annotations

import torch
from torch import nn

from prefix_store.format import BackboneShape, Prefix


class PrefixEncoder(nn.Module):
    """P' [P, k] -> MLP -> [num_layers, 2, num_heads, P, head_dim] for one target."""

    def __init__(
        self, shape: BackboneShape, num_virtual_tokens: int, mid_dim: int, embed_dim: int | None = None
    ):
        super().__init__()
        self.shape = shape
        self.num_virtual_tokens = num_virtual_tokens
        embed_dim = embed_dim or shape.hidden_size
        # The authors use nn.Embedding(P, n_embd): standard-normal initialisation.
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, embed_dim))
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mid_dim),
            nn.Tanh(),
            nn.Linear(mid_dim, shape.num_layers * 2 * shape.kv_heads * shape.head_dim),
        )

    def forward(self) -> torch.Tensor:
        s = self.shape
        out = self.mlp(self.embedding)  # [P, L * 2 * Hkv * d]
        # slot order (layer, key/value) as in the authors' code: layer l = slots 2l (key), 2l+1 (value)
        out = out.view(self.num_virtual_tokens, s.num_layers, 2, s.kv_heads, s.head_dim)
        return out.permute(1, 2, 3, 0, 4)  # [L, 2, Hkv, P, d]


class PrefixTuner(nn.Module):
    """One PrefixEncoder per target, each with its own P' and MLP."""

    def __init__(
        self, shape: BackboneShape, targets: tuple[str, ...], num_virtual_tokens: int, mid_dim: int = 512
    ):
        super().__init__()
        self.model_type = shape.model_type
        self.encoders = nn.ModuleDict(
            {name: PrefixEncoder(shape, num_virtual_tokens, mid_dim) for name in targets}
        )

    def forward(self) -> dict[str, torch.Tensor]:
        return {name: encoder() for name, encoder in self.encoders.items()}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def export(self, dtype: torch.dtype = torch.float32, prompt_template: str | None = None,
               extra_metadata: dict[str, str] | None = None) -> Prefix:  # fmt: skip
        """Run the MLPs once and keep only their output: the prefix the server serves."""
        targets = {name: t.to(dtype).contiguous().cpu() for name, t in self().items()}
        return Prefix(self.model_type, targets, prompt_template, dict(extra_metadata or {}))

    def fit_to(self, activations: dict[str, torch.Tensor], steps: int = 300, lr: float = 1e-3) -> float:
        """Initialise from real words (paper §7.2): regress each MLP's output onto the backbone's keys and values
        of a real text (`activations[target]`: [L, 2, H, P, d]). Returns the final mean squared error."""
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        loss = torch.zeros(())
        for _ in range(steps):
            out = self()
            loss = sum(nn.functional.mse_loss(out[name], activations[name]) for name in out) / len(out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return float(loss.detach())
