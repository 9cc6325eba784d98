"""Give a freshly initialised GPT-2 a copy circuit (an induction head) before any training.

Induction heads form late and suddenly in training (Olsson et al., 2022) -- too late for a CPU-sized run. So
the demo backbone starts with one built by hand, in reserved orthonormal subspaces of the residual stream
(all orthogonal to the all-ones direction, so LayerNorm's mean subtraction leaves them alone):

- token identity `T` (wte = a random unit vector per token, scaled by `a`, in T; the tied unembedding reads T);
- position `P`: sinusoids of `K` high frequencies (wpe, norm `b`);
- "previous token" `PT`: written by layer 0.

Layer 0, head 0 is a previous-token head: its query is the position rotated back by one step, its key the
position, so position i attends to i-1 (sharpened by `beta0`); it copies T of i-1 into PT.
Layer 1, head 0 is an induction head: query = T of the current token, key = PT (the token before), so
position i attends to every j whose previous token is the current token; it writes the token at j into T
(scaled by `alpha`), which the tied unembedding turns into a high logit for that token.
Everything else keeps HF's random initialisation; training then makes the circuit useful on real text.
"""

from __future__ import annotations

import math

import torch
from transformers import GPT2LMHeadModel


def frequencies(count: int, max_positions: int, seed: int = 0, tries: int = 400) -> torch.Tensor:
    """High frequencies whose cosine sum peaks sharply at offset 0 against offsets -1 and 1..max_positions."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.cat([torch.tensor([-1.0]), torch.arange(1.0, max_positions + 1)])
    best, best_margin = None, -1.0
    for _ in range(tries):
        omega = math.pi * (0.35 + 0.65 * torch.rand(count, generator=g))
        margin = count - torch.cos(offsets[:, None] * omega[None, :]).sum(1).max().item()
        if margin > best_margin:
            best, best_margin = omega, margin
    assert best is not None
    return best


@torch.no_grad()
def plant_induction(model: GPT2LMHeadModel, *, token_dims: int = 64, position_pairs: int = 16, a: float = 1.0,
                    b: float = 1.0, gamma: float = 1.0, alpha: float = 3.0, beta0: float = 40.0,
                    beta1: float = 30.0, quiet_rest: float = 1.0, seed: int = 0) -> None:  # fmt: skip
    config = model.config
    d, heads, positions, vocab = config.n_embd, config.n_head, config.n_positions, config.vocab_size
    hd = d // heads
    pd = 2 * position_pairs
    assert token_dims <= hd and pd <= hd and 1 + 2 * token_dims + pd <= d
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g)
    basis[:, 0] = 1.0
    basis = torch.linalg.qr(basis)[0][:, 1:]  # orthonormal, orthogonal to the all-ones vector
    T, P, PT = (
        basis[:, :token_dims],
        basis[:, token_dims : token_dims + pd],
        basis[:, token_dims + pd :][:, :token_dims],
    )

    tr = model.transformer
    identity = torch.randn(vocab, token_dims, generator=g)
    identity = identity / identity.norm(dim=1, keepdim=True)
    tr.wte.weight.copy_(a * identity @ T.T)
    omega = frequencies(position_pairs, positions, seed)
    angle = torch.arange(positions, dtype=torch.float32)[:, None] * omega[None, :]
    pos = torch.cat([angle.cos(), angle.sin()], dim=1) / math.sqrt(
        position_pairs
    )  # unit norm, [positions, pd]
    tr.wpe.weight.copy_(b * pos @ P.T)

    for block in tr.h:  # keep the rest of the network quiet at first so the circuit is readable
        block.attn.c_proj.weight.mul_(quiet_rest)
        block.mlp.c_proj.weight.mul_(quiet_rest)
    scale_hd = math.sqrt(hd)  # HF divides scores by sqrt(head_dim)

    # layer 0, head 0: previous-token head
    s0 = math.sqrt(d / (a * a + b * b))  # what ln_1 multiplies the residual by
    rot = torch.zeros(pd, pd)  # maps pos(i) -> pos(i-1)
    c, s = omega.cos(), omega.sin()
    k = torch.arange(position_pairs)
    rot[k, k], rot[k, k + position_pairs] = c, s  # cos(w(i-1)) = cos wi cos w + sin wi sin w
    rot[k + position_pairs, k + position_pairs], rot[k + position_pairs, k] = c, -s
    attn0 = tr.h[0].attn
    W = attn0.c_attn.weight  # [d, 3d]: q | k | v
    W[:, 0:hd] = 0
    W[:, d : d + hd] = 0
    W[:, 2 * d : 2 * d + hd] = 0
    q_scale = beta0 * scale_hd / (b * b)  # score at the right offset = beta0
    W[:, 0:pd] = (P @ rot.T) / s0 * math.sqrt(q_scale)
    W[:, d : d + pd] = P / s0 * math.sqrt(q_scale)
    W[:, 2 * d : 2 * d + token_dims] = T / (s0 * a)  # v = unit token identity
    attn0.c_attn.bias[0:hd] = 0
    attn0.c_attn.bias[d : d + hd] = 0
    attn0.c_attn.bias[2 * d : 2 * d + hd] = 0
    attn0.c_proj.weight[0:hd] = 0
    attn0.c_proj.weight[0:token_dims] = gamma * PT.T
    attn0.c_proj.bias.zero_()

    # layer 1, head 0: induction head
    s1 = math.sqrt(d / (a * a + b * b + gamma * gamma))
    attn1 = tr.h[1].attn
    W = attn1.c_attn.weight
    W[:, 0:hd] = 0
    W[:, d : d + hd] = 0
    W[:, 2 * d : 2 * d + hd] = 0
    q_scale = beta1 * scale_hd / (a * gamma)
    W[:, 0:token_dims] = T / s1 * math.sqrt(q_scale)
    W[:, d : d + token_dims] = PT / s1 * math.sqrt(q_scale)
    W[:, 2 * d : 2 * d + token_dims] = T / (s1 * a)
    attn1.c_attn.bias[0:hd] = 0
    attn1.c_attn.bias[d : d + hd] = 0
    attn1.c_attn.bias[2 * d : 2 * d + hd] = 0
    attn1.c_proj.weight[0:hd] = 0
    attn1.c_proj.weight[0:token_dims] = alpha * T.T
    attn1.c_proj.bias.zero_()
