"""Throughput accounting: model FLOPs per token, peak TFLOPS per GPU, MFU, and a per-phase step timer.

Pure functions and one small class; nothing here touches torch.distributed or CUDA (the trainer wires them in).

Conventions of `flops_per_token` (model FLOPs, the PaLM appendix B / Megatron-LM convention):
- One multiply-add is 2 FLOPs. A matmul of a token's d_in-vector by a [d_in, d_out] weight is 2 * d_in * d_out.
- Training = forward + backward = 3 x forward: the backward of every matmul computes the input gradient and the
  weight gradient, each as large as the forward. The same factor 3 is applied to every term (for the elementwise
  connection work it is an approximation; Sinkhorn's backward, which re-runs the iterations, is closer to 4x).
- Recomputation (`parallel.recompute`) is NOT counted: this is model FLOPs, so MFU does not rise by recomputing.
- Attention scores are counted over the full T x T square, not halved for the causal mask (PaLM: 6N + 12 L H Q T
  per token; Megatron's 72 B s L h^2 (1 + s/6h + ...) counts the same). `causal=True` halves that term instead,
  the work a causal kernel actually does (FlashAttention's benchmark convention).
- Not counted anywhere (each well under 1% at the model sizes trained here, as is standard): RMSNorms of the
  sub-layers and the final norm, RoPE, softmax, SiLU and the gating product, the loss, the embedding lookup.

Per token, with C = dim, L = n_layer, H = n_head, K = n_kv_head, D = head_dim, F = ffn_hidden_dim, V = vocab,
T = seq_len, n = n_streams, S = 2 L connection sites (attention and FFN per block), all x3 for training:

    dense      = 2 * [L * (2 C H D + 2 C K D + 3 C F) + C V]   q, o: C x HD; k, v: C x KD (GQA); SwiGLU w1, w3, w2;
                                                               the LM head C x V (counted with tied embeddings too);
                                                               i.e. 6 x the matmul weights, embedding table excluded
    attention  = L * 4 T H D           QK^T (2 T H D) and AV (2 T H D) per query token, full square (see above)
    connection = S * site + collapse   `site_flops` below, forward per site; collapse = (n - 1) C, the stream sum
                                       before the final norm (the expand is a copy: 0)

MLA (model.attention=mla; R kv_lora_rank, Q q_lora_rank, N / P / V the nope / rope / value head widths): the
attention projections C H D + C K D (x2) become C Q + Q H (N + P) (or C H (N + P) without q LoRA) + C (R + P)
+ R H (N + V) + H V C (`attention_shapes`), and attention = L * 2 T H (N + P + V): the training forward
decompresses keys and values, so the scores are over N + P per head (the decode cache's absorbed form is not
counted here).
MoE layers (model.ffn=moe) count their active FFN weights instead of 3 C F: the router C E and the top-k routed
plus shared experts, 3 C H each (`model.moe.active_ffn_delta`).

`site_flops` (forward, one token, one site), k = n^2 + 2n coefficients (2n for mHC's identity-H_res arm):

    residual   add       C                  x + F(x)
    mHC        project   2 nC k             vec(x) [nC] @ phi [nC, k]                                   (matmul)
               norm      2 nC + k           sum of squares of vec(x), then k divisions (reordered RMSNorm)
               gates     3 k + n            alpha * h + b, sigmoid, the 2x of H_post
               sinkhorn  2 n^2 + 4 n^2 t    exp of the shifted logits; per iteration column sums, divide, row
                                            sums, divide (t = t_max); 0 for the identity arm
               pre       2 nC               h_pre [1, n] @ x [n, C]                                     (matmul)
               res       2 n^2 C            H_res [n, n] @ x [n, C]; 0 for the identity arm              (matmul)
               post      2 nC               + H_post^T y: n C products, n C adds
    HC         norm      4 nC               per-stream RMSNorm (square, mean, scale, gain); dynamic only
               project   2 nC (n + 2)       norm(x) [n, C] @ W [C, n + 2]; dynamic only                 (matmul)
               gates     3 n (n + 2)        tanh, scale s_alpha / s_beta, add the static part; dynamic only
               pre, res, post               as mHC (static HC runs only these three)

The parts marked (matmul) are exactly what `torch.utils.flop_counter.FlopCounterMode` counts for a forward pass
(tests/train/test_throughput.py checks this).

MFU = tokens/s per device x training FLOPs per token / peak FLOP/s of the device (dense bf16, no sparsity).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mhc_train.config import ConnectionConfig, ModelConfig
from mhc_train.model.moe import active_ffn_delta
from mhc_train.model.transformer import ffn_hidden_dim, head_dim

TRAIN_FACTOR = 3  # forward + backward = 3 x forward
MATMUL_PARTS = ("project", "pre", "res")  # the site parts that are matmuls (what a FLOP counter sees)


def site_flops(conn_cfg: ConnectionConfig, dim: int) -> dict[str, int]:
    """Forward FLOPs of ONE connection site for ONE token, by part (the table in the module docstring).

    Keys: residual -> add; hc -> norm, project, gates (dynamic only), pre, res, post; mhc -> project, norm, gates,
    sinkhorn, pre, res, post. Multiply by 3 for training and by 2 * n_layer for the model.
    """
    c, n = dim, conn_cfg.n_streams
    if conn_cfg.type == "residual":
        return {"add": c}
    mix = {"pre": 2 * n * c, "res": 2 * n * n * c, "post": 2 * n * c}
    if conn_cfg.type == "hc":
        if not conn_cfg.hc_dynamic:
            return mix
        return {"norm": 4 * n * c, "project": 2 * n * c * (n + 2), "gates": 3 * n * (n + 2), **mix}
    if conn_cfg.type in ("mhc", "mhc_single_pass"):  # single-pass: the same site ops, its read mix lagged
        identity = conn_cfg.h_res == "identity"
        k = 2 * n if identity else n * n + 2 * n
        return {
            "project": 2 * n * c * k,
            "norm": 2 * n * c + k,
            "gates": 3 * k + n,
            "sinkhorn": 0 if identity else 2 * n * n + 4 * n * n * conn_cfg.t_max,
            "pre": mix["pre"],
            "res": 0 if identity else mix["res"],
            "post": mix["post"],
        }
    raise ValueError(f"connection.type={conn_cfg.type!r} is invalid: allowed values are residual, hc, mhc")


def flops_per_token(
    model_cfg: ModelConfig, conn_cfg: ConnectionConfig, seq_len: int, causal: bool = False
) -> dict[str, int]:
    """Training (forward + backward = 3 x forward) FLOPs per token of the model, split as
    {"dense", "attention", "connection", "total"}; every formula is in the module docstring.

    `seq_len` is the trained sequence length T (attention grows with it). `causal=False` (the default, PaLM /
    Megatron) counts the full T x T score matrix; `causal=True` halves the attention term.
    """
    m = model_cfg
    c, layers, heads = m.dim, m.n_layer, m.n_head
    attn_proj, qk_v_width = attention_shapes(m)
    ffn = 3 * c * ffn_hidden_dim(m)  # SwiGLU w1, w3: C x F; w2: F x C
    dense = 2 * (layers * (attn_proj + ffn) + c * m.vocab_size)  # + the LM head C x V
    dense += 2 * active_ffn_delta(m, ffn_hidden_dim(m))  # MoE: router + top-k and shared experts, not F
    attention = layers * 2 * seq_len * heads * qk_v_width  # QK^T and AV: 2 T H (D + D) per query token for GQA
    if causal:
        attention //= 2
    n_sites = 2 * layers
    connection = n_sites * sum(site_flops(conn_cfg, c).values()) + (conn_cfg.n_streams - 1) * c  # + the collapse
    out = {k: TRAIN_FACTOR * v for k, v in (("dense", dense), ("attention", attention), ("connection", connection))}
    out["total"] = out["dense"] + out["attention"] + out["connection"]
    return out


def attention_shapes(m: ModelConfig) -> tuple[int, int]:
    """(the attention projections' weights per layer, the query/key width plus the value width per head).

    GQA: (2 C H D + 2 C K D, 2 D). MLA (model.attention=mla, the table in the module docstring): wq (or wq_a, wq_b),
    wkv_a, wkv_b and wo, and (N + P) + V: the scores use the nope and rope widths, the values their own width."""
    c, heads = m.dim, m.n_head
    if m.attention == "mla":
        a = m.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = a.q_lora_rank * (c + heads * qk) if a.q_lora_rank else c * heads * qk  # wq_a, wq_b | wq
        kv = c * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * heads * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + heads * a.v_head_dim * c, qk + a.v_head_dim  # + wo: HV x C
    d, kv_heads = head_dim(m), m.n_kv_head or m.n_head
    return 2 * c * heads * d + 2 * c * kv_heads * d, 2 * d  # wq, wo: C x HD; wk, wv: C x KD


# Dense (no sparsity) bf16 tensor-core peak, TFLOPS, from the vendors' data sheets.
PEAK_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
}

# `torch.cuda.get_device_name()` strings -> PEAK_TFLOPS keys, most specific first (searched case-insensitively).
# "NVIDIA H100 80GB HBM3" and "NVIDIA H100 SXM5 80GB" are the SXM part; "NVIDIA A100-SXM4-80GB" and
# "NVIDIA A100-PCIE-40GB" share one peak; "NVIDIA L40" (no S) and "NVIDIA GB200" are not in the table.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"H100.*PCIE", "H100 PCIe"),
    (r"H100.*NVL", "H100 NVL"),
    (r"H100", "H100 SXM"),
    (r"H200", "H200"),
    (r"(?<!G)B200", "B200"),
    (r"A100", "A100"),
    (r"L40S", "L40S"),
)


def device_peak_tflops(name: str, override: float = 0) -> float | None:
    """Dense bf16 peak TFLOPS of the device called `name` (a `torch.cuda.get_device_name()` string such as
    "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", or a PEAK_TFLOPS key); `override` > 0 wins.
    None for a CPU, an empty name or a device not in the table (then MFU is not reported)."""
    if override and override > 0:
        return float(override)
    if not name:
        return None
    if name in PEAK_TFLOPS:
        return PEAK_TFLOPS[name]
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return PEAK_TFLOPS[key]
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token_total: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.4 = 40%): achieved FLOP/s per device / peak FLOP/s. None when the
    peak is unknown (None or <= 0). `flops_per_token_total` is `flops_per_token(...)["total"]`."""
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return tokens_per_s_per_device * flops_per_token_total / (peak_tflops * 1e12)


class StepTimer:
    """Wall time per named phase, per step, over a window of steps.

        timer = StepTimer()
        for step in ...:
            with timer("data"): batch = next(loader)
            with timer("forward_backward"): loss = engine.forward_backward(...)
            with timer("optimizer"): engine.step()
            timer.step()
        timer.window()  # {"data": s/step, "forward_backward": s/step, "optimizer": s/step}, then starts afresh

    A phase may be entered several times per step (each micro-batch) and phases may nest ("communication" inside
    "forward_backward"): each accumulates its own wall time, so nested phases overlap and need not sum to the step.
    The timer never synchronizes: CUDA work is asynchronous, so on CUDA the caller calls
    `torch.cuda.synchronize()` before a phase ends (or accepts that a phase shows launch time only and the wait
    surfaces in whichever phase synchronizes next). `add` records a duration measured elsewhere (CUDA events).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._totals: dict[str, float] = {}
        self._steps = 0

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._totals.setdefault(phase, 0.0)  # ordered by first entry, nested phases after their parent
        start = self._clock()
        try:
            yield
        finally:
            self.add(phase, self._clock() - start)

    def add(self, phase: str, seconds: float) -> None:
        self._totals[phase] = self._totals.get(phase, 0.0) + seconds

    def step(self, n: int = 1) -> None:
        """Mark the end of `n` steps of the window."""
        self._steps += n

    @property
    def steps(self) -> int:
        """Steps marked in the current window."""
        return self._steps

    def window(self, steps: int | None = None) -> dict[str, float]:
        """{phase: seconds per step} over the window, in the order phases were first entered, then reset.

        Per step means divided by `steps` if given, else by the steps marked with `step()`, else by 1 (totals).
        """
        per = steps if steps else (self._steps or 1)
        out = {phase: total / per for phase, total in self._totals.items()}
        self._totals, self._steps = {}, 0
        return out
