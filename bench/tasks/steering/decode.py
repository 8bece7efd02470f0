"""A lean batched decoder over a HookedTransformer's own weights, for steered generation.

TransformerLens's forward pass is built for inspection: on every call it transposes and
copies weights (`W.T.contiguous()` in every linear), keeps the KV cache unrotated and
rotates every cached key again at every step, concatenates the cache, and runs dozens of
hook points. For generation that overhead is most of a decode step on a CPU. This module
runs the same computation over the same weights with:

- weights laid out once (fused Q/K/V, fused gate/in) for `F.linear`;
- a preallocated KV cache holding rotated keys, written in place;
- `scaled_dot_product_attention` (grouped-query heads shared as TransformerLens shares them);
- only the hook points an intervention names, called as TransformerLens calls a hook:
  `fn(activation, hook)` with `hook.name` the canonical hook name, so
  `bench.tasks.steering.generate`'s steering hooks (and any other intervention that is a function of
  the activation at a hook) plug in unchanged.

Supported: the decoder-only pre-norm architectures with RMSNorm or LayerNorm, rotary or
learned absolute positions, gated or plain MLPs, multi-head or grouped-query attention
(Llama, SmolLM2, Mistral, Qwen2, GPT-2, Pythia-style without parallel blocks), and
Gemma 3's additions:

- a second norm after attention and after the MLP (`ln1_post`, `ln2_post`), applied
  where TransformerLens applies them: before `hook_attn_out` and `hook_mlp_out`;
- QK-norm (an RMSNorm over each head's query and key, before the rotation);
- sliding-window layers beside global ones (`attn_types`, `window_size`), each layer
  rotating with its own attention module's tables (Gemma 3: base 10k local, 1M global);
- the embedding scale sqrt(d_model), which TransformerLens keeps inside `W_E` (its
  Gemma conversion multiplies the embedding by it), so there is nothing to add;
- Gemma's RMSNorm weight is `1 + w` in Hugging Face's module and stored already
  added in TransformerLens's `ln*.w`, so every norm here multiplies by the stored weight.

`unsupported(model)` says why another model (soft caps, parallel blocks, ...) is not,
and `bench.tasks.steering.generate.generate` then uses TransformerLens's own path. Logits match
TransformerLens's forward with the same hooks to about 1e-5 (`tests/test_decode.py`,
`benchmarks/steering.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.core.hooks import POINTS, parse_hook_name

log = logging.getLogger(__name__)

HOOK_POINTS = POINTS  # the points inside a block this decoder can call
Hook = tuple[str, Callable[[torch.Tensor, Any], torch.Tensor]]


@dataclass(frozen=True)
class HookPoint:
    """What a hook function receives as its `hook` argument (TransformerLens passes its
    HookPoint; steering functions read only `.name`)."""

    name: str


def unsupported(model: Any) -> str | None:
    """Why the lean decoder cannot run `model` exactly, or None when it can."""
    cfg = model.cfg
    local = cfg.use_local_attn
    checks = {
        "normalization_type": cfg.normalization_type in ("RMS", "LN"),
        "positional_embedding_type": cfg.positional_embedding_type in ("rotary", "standard"),
        "final norm": cfg.final_rms or cfg.normalization_type == "LN",
        "act_fn": cfg.act_fn in ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"),
        "post-norms other than RMS": not (cfg.use_normalization_before_and_after
                                          and cfg.normalization_type != "RMS"),
        "attn_scores_soft_cap": cfg.attn_scores_soft_cap <= 0,
        "output_logits_soft_cap": cfg.output_logits_soft_cap <= 0,
        "parallel_attn_mlp": not cfg.parallel_attn_mlp,
        "attn_only": not cfg.attn_only,
        "post_embedding_ln": not cfg.post_embedding_ln,
        "attention_dir": cfg.attention_dir == "causal",
        "rotary scaling": not (cfg.use_NTK_by_parts_rope or getattr(cfg, "use_dynamic_ntk_rope", False)),
        "use_local_attn without attn_types/window_size": not local or (
            cfg.attn_types is not None and isinstance(cfg.window_size, int)),
        "use_attn_in/split_qkv": not (cfg.use_attn_in or cfg.use_split_qkv_input),
        "logn/sinks/clip": not (getattr(cfg, "use_logn_attn", False)
                                or getattr(cfg, "use_attention_sinks", False)
                                or getattr(cfg, "clip_qkv", None) is not None),
        "original_architecture": "Olmo" not in str(cfg.original_architecture),
    }  # fmt: skip
    failed = [name for name, ok in checks.items() if not ok]
    return f"{cfg.original_architecture}: {', '.join(failed)} not supported" if failed else None


class LeanDecoder:
    """Prefill a batch of rows sharing one prompt, then decode one token at a time.

    Rows may carry different interventions (a steering vector per row); the hook
    functions are called at every position, prompt and generated tokens alike.
    """

    def __init__(self, model: Any) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"lean decoder: {reason}")
        self.model = model
        cfg = model.cfg
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.d_head = cfg.d_head
        self.gated = cfg.gated_mlp
        self.act = _activation(cfg.act_fn)
        self.rotary = cfg.positional_embedding_type == "rotary"
        if self.rotary:
            self.rotary_dim = cfg.rotary_dim
            self.adjacent = cfg.rotary_adjacent_pairs
        self.layers = [self._layer(block) for block in model.blocks]
        self.ln_final = _norm_weights(model.ln_final)
        self.w_u = model.unembed.W_U.T.contiguous()
        self.b_u = model.unembed.b_U
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None
        self.length = 0

    def _layer(self, block: Any) -> dict[str, Any]:
        attn, mlp = block.attn, block.mlp
        grouped = hasattr(attn, "_W_K") and not self.cfg.ungroup_grouped_query_attention
        w_k = attn._W_K if grouped else attn.W_K
        w_v = attn._W_V if grouped else attn.W_V
        b_k = attn._b_K if grouped else attn.b_K
        b_v = attn._b_V if grouped else attn.b_V
        flat = lambda w: w.permute(0, 2, 1).reshape(-1, w.shape[1])  # noqa: E731  heads x d_model -> rows
        layer = {
            "w_qkv": torch.cat([flat(attn.W_Q), flat(w_k), flat(w_v)]).contiguous(),
            "b_qkv": torch.cat([attn.b_Q.reshape(-1), b_k.reshape(-1), b_v.reshape(-1)]),
            "w_o": attn.W_O.reshape(-1, attn.W_O.shape[-1]).T.contiguous(),
            "b_o": attn.b_O,
            "w_out": mlp.W_out.T.contiguous(),
            "b_out": mlp.b_out,
            "b_in": mlp.b_in,
            "attn": attn,  # its own rotary tables: local and global layers rotate differently
            # sliding-window layers attend to the last `window_size` positions only
            "window": self.cfg.window_size
            if getattr(attn, "attn_type", "global") == "local"
            else None,
        }
        if self.gated:
            layer["w_gate_in"] = torch.cat([mlp.W_gate.T, mlp.W_in.T]).contiguous()
        else:
            layer["w_in"] = mlp.W_in.T.contiguous()
        layer["ln1"], layer["ln2"] = _norm_weights(block.ln1), _norm_weights(block.ln2)
        # Gemma 2/3: a norm on each sublayer's output too, before its hook (as in TransformerLens)
        layer["ln1_post"] = _norm_weights(block.ln1_post) if hasattr(block, "ln1_post") else None
        layer["ln2_post"] = _norm_weights(block.ln2_post) if hasattr(block, "ln2_post") else None
        qk = getattr(self.cfg, "use_qk_norm", False)
        layer["q_norm"] = _norm_weights(attn.q_norm) if qk else None
        layer["k_norm"] = _norm_weights(attn.k_norm) if qk else None
        return layer

    # --- the forward pass ---------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, hooks: Sequence[Hook], max_new: int) -> torch.Tensor:
        """Run the prompt (rows x positions) and allocate the cache for `max_new` more
        tokens; returns the last position's logits (rows x vocab)."""
        rows, width = tokens.shape
        total = width + max_new
        if total > self.cfg.n_ctx:
            raise ValueError(
                f"prompt of {width} tokens + {max_new} new exceeds n_ctx {self.cfg.n_ctx}"
            )
        if self.rotary:
            for layer in self.layers:  # TransformerLens grows its tables the same way
                attn = layer["attn"]
                if attn.rotary_cos.shape[0] < total:
                    attn._extend_rotary_embeddings(total)
        shape = (len(self.layers), rows, self.n_kv, total, self.d_head)
        dtype, device = self.w_u.dtype, self.w_u.device
        self.cache_k = torch.empty(shape, dtype=dtype, device=device)
        self.cache_v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        return self._forward(tokens, hooks)[:, -1]

    @torch.inference_mode()
    def step(self, token: torch.Tensor, hooks: Sequence[Hook]) -> torch.Tensor:
        """One new token per row (rows,); returns its logits (rows x vocab)."""
        return self._forward(token[:, None], hooks)[:, -1]

    @torch.inference_mode()
    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices) in the cache: finished rows stop costing steps."""
        rows = rows.to(self.cache_k.device)
        self.cache_k = self.cache_k.index_select(1, rows)
        self.cache_v = self.cache_v.index_select(1, rows)

    def release(self) -> None:
        """Free the cache (the next `prefill` allocates a new one)."""
        self.cache_k = self.cache_v = None
        self.length = 0

    def _forward(self, tokens: torch.Tensor, hooks: Sequence[Hook]) -> torch.Tensor:
        table = _hook_table(hooks, len(self.layers))
        start, width = self.length, tokens.shape[1]
        x = self.model.embed.W_E[tokens]  # Gemma's sqrt(d_model) scale is inside W_E
        if self.cfg.positional_embedding_type == "standard":
            x = x + self.model.pos_embed.W_pos[start : start + width]
        angles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per distinct rotary table
        for index, layer in enumerate(self.layers):
            hook = table.get(index, {})
            x = _call(hook, "hook_resid_pre", x)
            rotation = self._angles(layer["attn"], start, width, x.dtype, angles)
            attn = self._attention(index, layer, _norm(x, layer["ln1"], self.cfg), rotation, start)
            if layer["ln1_post"] is not None:
                attn = _norm(attn, layer["ln1_post"], self.cfg)
            attn = _call(hook, "hook_attn_out", attn)
            x = x + attn
            h = _norm(x, layer["ln2"], self.cfg)
            if self.gated:
                gate, lin = F.linear(h, layer["w_gate_in"]).chunk(2, dim=-1)
                post = self.act(gate) * lin + layer["b_in"]
            else:
                post = self.act(F.linear(h, layer["w_in"], layer["b_in"]))
            post = _call(hook, "mlp.hook_post", post)
            out = F.linear(post, layer["w_out"], layer["b_out"])
            if layer["ln2_post"] is not None:
                out = _norm(out, layer["ln2_post"], self.cfg)
            out = _call(hook, "hook_mlp_out", out)
            x = _call(hook, "hook_resid_post", x + out)
        self.length = start + width
        return F.linear(_norm(x, self.ln_final, self.cfg), self.w_u, self.b_u)

    def _angles(self, attn, start, width, dtype, seen) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cos/sin rows of this layer's rotary tables for the positions in hand."""
        if not self.rotary:
            return None
        key = id(attn.rotary_cos)
        if key not in seen:
            seen[key] = (
                attn.rotary_cos[start : start + width][None, None].to(dtype),
                attn.rotary_sin[start : start + width][None, None].to(dtype),
            )
        return seen[key]

    def _attention(self, index, layer, h, rotation, start) -> torch.Tensor:
        rows, width, _ = h.shape
        qkv = F.linear(h, layer["w_qkv"], layer["b_qkv"])
        q, k, v = qkv.split(
            [self.n_heads * self.d_head, self.n_kv * self.d_head, self.n_kv * self.d_head], dim=-1
        )
        q = q.view(rows, width, self.n_heads, self.d_head)
        k = k.view(rows, width, self.n_kv, self.d_head)
        if layer["q_norm"] is not None:  # QK-norm: per head, before the rotation
            q, k = _norm(q, layer["q_norm"], self.cfg), _norm(k, layer["k_norm"], self.cfg)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(rows, width, self.n_kv, self.d_head).transpose(1, 2)
        if rotation is not None:
            q, k = self._rotate(q, *rotation), self._rotate(k, *rotation)
        end = start + width
        self.cache_k[index, :, :, start:end] = k
        self.cache_v[index, :, :, start:end] = v
        if width > 1 and start > 0:  # a multi-token chunk after a cache: not used by generate
            raise NotImplementedError("lean decoder: prefill once, then one token per step")
        window = layer["window"]
        first = 0 if window is None or width > 1 else max(0, end - window)  # a step's window
        keys, values = self.cache_k[index, :, :, first:end], self.cache_v[index, :, :, first:end]
        mask, causal = None, width > 1
        if causal and window is not None and width > window:  # the prompt outruns the window
            query, key = torch.arange(width)[:, None], torch.arange(width)[None, :]
            mask, causal = ((key <= query) & (key > query - window)).to(h.device), False
        z = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            is_causal=causal,
            scale=1.0 / self.cfg.attn_scale if self.cfg.use_attn_scale else 1.0,
            enable_gqa=self.n_kv != self.n_heads,
        )
        z = z.transpose(1, 2).reshape(rows, width, self.n_heads * self.d_head)
        return F.linear(z, layer["w_o"], layer["b_o"])

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """TransformerLens's rotary embedding (its own cos/sin tables) on rows x heads x pos x d."""
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.adjacent:
            flip = torch.stack([-rot[..., 1::2], rot[..., ::2]], dim=-1).flatten(-2)
        else:
            half = rot.shape[-1] // 2
            flip = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        rotated = rot * cos + flip * sin
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def _hook_table(hooks: Sequence[Hook], n_layers: int) -> dict[int, dict[str, list]]:
    """{layer: {point: [(fn, HookPoint)]}}; a hook name this decoder has no point for is an error."""
    table: dict[int, dict[str, list]] = {}
    for name, fn in hooks:
        try:
            layer, point = parse_hook_name(name)
        except ValueError:
            layer, point = -1, None
        if point not in HOOK_POINTS or not 0 <= layer < n_layers:
            raise ValueError(f"lean decoder: hook {name!r} is not one of blocks.L.{HOOK_POINTS}")
        table.setdefault(layer, {}).setdefault(point, []).append((fn, HookPoint(name)))
    return table


def _call(hook: dict[str, list], point: str, x: torch.Tensor) -> torch.Tensor:
    for fn, where in hook.get(point, ()):
        out = fn(x, where)
        x = x if out is None else out
    return x


def _norm_weights(module: Any) -> dict[str, Any]:
    return {
        "w": getattr(module, "w", None),
        "b": getattr(module, "b", None),
        "eps": getattr(module, "eps", 1e-5),
    }


def _norm(x: torch.Tensor, weights: dict[str, Any], cfg: Any) -> torch.Tensor:
    """TransformerLens's RMSNorm (x / sqrt(mean x^2 + eps) * w) or LayerNorm, in its order of
    operations, so the decoder's activations match its hooks'."""
    if cfg.normalization_type == "RMS":
        scale = (x.float().pow(2).mean(-1, keepdim=True) + weights["eps"]).sqrt()
        return (x.float() / scale).to(x.dtype) * weights["w"]
    centred = x - x.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + weights["eps"]).sqrt()
    return centred / scale * weights["w"] + weights["b"]


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu
