"""Llama 2's forward pass as Meta's reference code (facebookresearch/llama, model.py) computes
it, written out here for checks: weights in Meta's layout (`tok_embeddings`, `layers.N.attention
.wq`, ...; wq/wk rows holding each head's rotary pairs interleaved), rotary embeddings as
complex rotations, no KV cache. Used by make_meta_fixtures.py (to prove the fixtures are in
Meta's layout: this gives transformers' logits from them) and check_meta.py (to run an export of
ours the way Meta's code would)."""

import torch


def join_shards(shards: list) -> dict:
    """Joins model-parallel state dicts along the axis each weight is split on."""
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        if name.endswith(("attention_norm.weight", "ffn_norm.weight")) or name in ("norm.weight", "rope.freqs"):
            out[name] = parts[0]
        elif name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            out[name] = torch.cat(parts, dim=1)
        else:
            out[name] = torch.cat(parts, dim=0)
    return out


def rms_norm(x, weight, eps):
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight.float()


@torch.no_grad()
def forward(state: dict, params: dict, tokens: list) -> torch.Tensor:
    """Logits [len, vocab] (float32) of one sequence."""
    w = {k: v.float() for k, v in state.items()}
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    eps = params.get("norm_eps", 1e-5)
    theta = params.get("rope_theta", 10000.0)
    n_layers = params["n_layers"]
    t = len(tokens)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs_cis = torch.polar(torch.ones(t, head_dim // 2), torch.outer(torch.arange(t).float(), freqs))

    def rotate(x):  # [t, heads, head_dim], pairs interleaved
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2)

    h = w["tok_embeddings.weight"][torch.tensor(tokens)]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(n_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"], eps)
        q = (x @ w[p + "attention.wq.weight"].T).view(t, n_heads, head_dim)
        k = (x @ w[p + "attention.wk.weight"].T).view(t, n_kv, head_dim)
        v = (x @ w[p + "attention.wv.weight"].T).view(t, n_kv, head_dim)
        q, k = rotate(q), rotate(k)
        rep = n_heads // n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim**0.5 + mask
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, dim)
        h = h + att @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(x @ w[p + "feed_forward.w1.weight"].T)
        h = h + (gate * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"], eps) @ w["output.weight"].T
