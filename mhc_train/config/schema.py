"""The config schema: every YAML under `configs/` is an instance of `Config`, and every list of allowed values is here.

- Hydra merges YAML into these dataclasses, so an unknown key or a wrong type fails before any work starts
  (mhc_train/config/load.py); the cross-field rules are in validate.py, and read the allowed values below.
- Each field carries a one-line comment: its unit, what it means, and why the default.
- `ConfigError` is the one error of this package: a user error (`MhcTrainError`) and a `ValueError`, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mhc_train.errors import MhcTrainError

CONNECTION_TYPES = ("residual", "hc", "mhc", "mhc_single_pass")  # mhc_single_pass: DeepSeek-V4.1 (docs/mhc.md 10)
H_RES_MODES = ("sinkhorn", "identity")
B_RES_INITS = ("uniform", "identity")
READ_INITS = ("uniform", "one_hot")
OUT_PROJ_INITS = ("none", "mul_sqrt_n", "div_sqrt_n")
BACKENDS = ("torch", "triton", "auto")
SINKHORN_BACKWARDS = ("unrolled", "implicit")
LR_SCHEDULES = ("cosine", "step", "constant", "wsd")
WSD_DECAY_SHAPES = ("linear", "1-sqrt")  # schedule.decay_shape of schedule=wsd
DOCUMENT_MASK_KERNELS = ("auto", "sdpa", "flex")  # data.document_mask_kernel (model/documents.py)
PRECISIONS = ("fp32", "bf16", "auto")
STREAM_DTYPES = ("fp32", "bf16")
ROPE_SCALINGS = ("none", "llama3")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("none", "ddp", "fsdp", "deepspeed")  # data parallel across the launched ranks (parallel.engine)
FFN_TYPES = ("dense", "moe")  # model.ffn
PP_SCHEDULES = ("1f1b", "interleaved1f1b", "zbv", "dualpipev", "csv")
SPLIT_BACKWARD_SCHEDULES = ("zbv", "dualpipev")  # schedules that run input and weight gradients as separate actions
RECOMPUTE_MODES = ("none", "mhc", "full")
CHECKPOINT_FORMATS = ("auto", "file", "dcp")
WANDB_MODES = ("offline", "online", "disabled")
ATTENTIONS = ("gqa", "mla")  # model.attention: grouped-query (LLaMA) or multi-head latent attention (DeepSeek-V2/V3)
NUMERICS = ("paper", "deepseek_v4")  # connection.numerics: the mHC arithmetic (docs/mhc.md section 8)
COLLAPSES = ("sum", "mean", "learned")  # connection.collapse: the final read of the n streams


class ConfigError(MhcTrainError, ValueError):
    """A config value is wrong; the message names the key, the value and what would work."""


@dataclass
class MLAConfig:
    """Multi-head latent attention's shapes (model.attention=mla; DeepSeek-V2/V3 defaults, the mHC paper's Table 5)."""

    q_lora_rank: int = 0  # low-rank query: C -> q_lora_rank -> heads (DeepSeek-V3: 1536); 0 = one plain projection
    kv_lora_rank: int = 512  # the compressed KV latent per token (what the decode cache holds; paper: 512)
    qk_nope_head_dim: int = 128  # per-head query/key width without RoPE (decompressed from the latent)
    qk_rope_head_dim: int = 64  # per-head query width with RoPE; the RoPE key of this width is shared by all heads
    v_head_dim: int = 128  # per-head value width (attention output per head)


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # tokens; must match the tokenizer (checked against the data manifest)
    dim: int = 256  # C, hidden width
    n_layer: int = 4  # transformer blocks; each has 2 connection sites (attention, FFN)
    n_head: int = 4  # attention heads; must divide dim
    n_kv_head: int = 0  # key/value heads for GQA; 0 = n_head (plain multi-head attention)
    head_dim: int = 0  # per-head width; 0 = dim // n_head (the mHC paper's 3B shape uses 16 x 128 at dim 1280)
    ffn_hidden_dim: int = 0  # SwiGLU hidden width; 0 = LLaMA's 2/3 * 4 * dim rounded up to multiple_of
    multiple_of: int = 32  # rounding of the auto FFN width (tensor-core friendly)
    max_seq_len: int = 256  # longest sequence RoPE is precomputed for
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the token embedding and the LM head
    init_std: float = 0.02  # std of the normal init of all linear weights (GPT-2 / LLaMA convention)
    # Storage dtype of the [B, T, n, C] stream state between sites: fp32, or bf16 (the mHC paper's setting: half the
    # stream's memory and traffic; the connection's coefficients stay fp32, the final stream sum accumulates in
    # fp32). bf16 needs bf16 compute (train.precision=bf16, or auto on CUDA).
    stream_dtype: str = "fp32"
    attention: str = "gqa"  # gqa (n_head / n_kv_head / head_dim) | mla (model.mla.*: DeepSeek's latent attention)
    mla: MLAConfig = field(default_factory=MLAConfig)  # read only when attention=mla
    # --- Hugging Face checkpoints (`mhc-train import-hf`); the defaults keep the model above bit for bit ---
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3), gains of size head_dim
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1's frequency-dependent stretch of the RoPE wavelengths)
    rope_scaling_factor: float = 8.0  # llama3: long wavelengths divided by this
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / this are fully scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / this are kept
    rope_original_max_seq_len: int = 8192  # llama3: the context the model was first trained at
    vocab_padded: bool = False  # vocab_size may exceed the tokenizer's pieces (Qwen pads its embedding rows)
    ffn: str = "dense"  # dense (SwiGLU) | moe (routed + shared experts, model.moe; the first_k_dense blocks stay dense)
    moe: MoEConfig = field(default_factory=lambda: MoEConfig())  # the MoE FFN's settings (read when ffn=moe)


@dataclass
class MoEConfig:
    """DeepSeek-V3-style mixture-of-experts FFN (model.ffn=moe; mhc_train/model/moe.py)."""

    n_routed_experts: int = 8  # routed experts per MoE layer (E)
    n_shared_experts: int = 1  # always-on experts, one dense SwiGLU of n_shared x expert_hidden_dim; 0 = none
    top_k: int = 2  # routed experts each token goes to (must be <= n_routed_experts)
    expert_hidden_dim: int = 0  # SwiGLU width of one expert; 0 = the model's FFN width
    first_k_dense: int = 1  # the leading blocks keep the dense FFN (DeepSeek-V3: 3, the mHC paper: 1)
    route_scale: float = 1.0  # the gate weights (sigmoid scores normalised over the selected experts) times this
    bias_update_rate: float = 0.001  # auxiliary-loss-free balancing: b_i += rate * sign(mean load - load_i) per step
    seq_aux_loss_coef: float = 0.0  # weight of DeepSeek-V3's sequence-wise balance loss; 0 = off (bias only)
    capacity_factor: float = 0.0  # tokens an expert takes, x its fair share N*k/E; 0 = dropless (overflow dropped)


@dataclass
class ConnectionConfig:
    # The arm's name, recorded in each run's summary.json (see arm.py); every configs/connection/*.yaml sets it to
    # its file name. "" (a config built in Python): derived from the values, as for runs written before names existed.
    name: str = ""
    type: str = "mhc"  # residual | hc | mhc | mhc_single_pass (DeepSeek-V4.1's lagged read)
    n_streams: int = 4  # n, the expansion rate; residual forces 1
    backend: str = "auto"  # torch | triton | auto (triton for CUDA tensors, torch elsewhere)
    # --- HC (Zhu et al.) ---
    hc_dynamic: bool = True  # DHC (the paper's default) adds input-dependent terms to the static B, A_m, A_r
    hc_dynamic_scale_init: float = 0.01  # s_alpha and s_beta at init
    hc_out_proj_init: str = "none"  # none | mul_sqrt_n | div_sqrt_n: scale the output projections' init std
    # --- mHC (DeepSeek) ---
    h_res: str = "sinkhorn"  # sinkhorn | identity (ablation: fixed identity H_res, dynamic H_pre/H_post)
    t_max: int = 20  # Sinkhorn iterations (paper: 20)
    sinkhorn_backward: str = "unrolled"  # unrolled (exact for t_max steps, the paper's) | implicit (fixed point)
    alpha_init: float = 0.01  # the three gates alpha_pre, alpha_post, alpha_res (paper: 0.01)
    phi_init_std: float = 0.02  # std of phi's normal init; 0 keeps streams identical forever (symmetry)
    b_pre_init: float = 0.0  # logit of H_pre (read_init=uniform); 0 gives a uniform read of 0.5 per stream
    read_init: str = "uniform"  # uniform (b_pre_init on every stream) | one_hot (site k reads stream k mod n, as HC)
    read_logit: float = 4.0  # read_init=one_hot: b_pre = +read_logit on stream k mod n, -read_logit elsewhere
    b_post_init: float = 0.0  # logit of H_post; 0 gives 2*sigmoid(0) = 1, as in HC
    b_res_init: str = "uniform"  # uniform (H_res = J/n) | identity (diagonal logit b_res_diag, 0 elsewhere)
    b_res_diag: float = 2.0  # diagonal logit for b_res_init=identity (2 -> ~0.71 on the diagonal at n=4)
    eps: float = 1e-6  # epsilon of the flattened nC RMSNorm
    # --- DeepSeek-V4 forms (docs/mhc.md sections 8-9) ---
    # paper: the mHC paper's arithmetic (exp start, no eps in Sinkhorn) | deepseek_v4: transformers' DeepseekV4
    # HyperConnection's (softmax start, + hc_eps after it and in every Sinkhorn denominator, H_pre + hc_eps)
    numerics: str = "paper"
    hc_eps: float = 1e-6  # deepseek_v4 numerics and the learned collapse: DeepSeek's hc_eps (their default 1e-6)
    # the final read of the n streams before the last RMSNorm: sum (the paper's) | mean (GLM-5.3) | learned
    # (DeepSeek-V4's HyperHead: sigmoid(scale * RMSNorm(vec x) @ fn + base) + hc_eps weights per stream)
    collapse: str = "sum"


@dataclass
class BlendSourceConfig:
    """One entry of `data.blend`: a source and its share of the training tokens; the per-source keys left empty take
    the value of `data.*`."""

    source: str = ""  # as data.source: shakespeare | a file, directory or glob | hf:<name>
    weight: float = 1.0  # share of the training windows (normalised over the entries; must be > 0)
    name: str = ""  # label in the metrics (val loss per source, token shares); "" = derived from the source
    text_field: str = ""  # "" = data.text_field
    hf_config: str = ""  # "" = data.hf_config
    hf_split: str = ""  # "" = data.hf_split


@dataclass
class DataConfig:
    source: str = (
        "shakespeare"  # shakespeare (bundled) | a file, directory or glob of txt/jsonl[.gz|.zst]/parquet | hf:<name>
    )
    hf_config: str = ""  # config (subset) of a Hugging Face dataset, e.g. sample-10BT for FineWeb; "" = its default
    hf_split: str = "train"  # split of a Hugging Face dataset (read in streaming mode)
    text_field: str = "text"  # the field (jsonl) or column (parquet, Hugging Face) holding the text
    txt_per_line: bool = False  # .txt inputs: each non-blank line is a document (false: each file is one)
    out_dir: str = "data_cache/shakespeare"  # root of the prepared directories (tokenizer, shards, manifest)
    tokenizer_model: str = ""  # a sentencepiece .model or a Hugging Face tokenizer.json to use instead of training one
    vocab_size: int = 4096  # BPE vocabulary trained by the prepare step
    val_fraction: float = 0.05  # share of documents held out for validation (at least one)
    num_workers: int = 1  # tokeniser processes for prepare; the shards are byte-identical for any count
    seed: int = 1234  # the train/val split and the tokenizer's training sample
    max_sentencepiece_chars: int = 20_000_000  # characters of the sample the tokenizer trains on (its time)
    tokenizer_sample_lines: int = 1_000_000  # lines in the seeded reservoir sample the tokenizer trains on (its memory)
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB at uint16): a 10B-token corpus is ~100 files
    verify: str = "size"  # check of the shards before training: size (cheap) | digest (sha256 of every shard)
    # Per-document attention (issue 29): a packed window's tokens attend only within their own document (EOS ends one)
    document_mask: bool = False  # false: attention runs across document boundaries (as before)
    document_rope_restart: bool = False  # with document_mask: RoPE positions restart at 0 at each document
    # A weighted blend of sources ([] = data.source alone); each prepared on its own with one shared tokenizer
    blend: list[BlendSourceConfig] = field(default_factory=list)
    document_mask_kernel: str = "auto"  # auto (= sdpa until flex is measured on a GPU) | sdpa | flex (CUDA)


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases, gates, HC static parts)
    beta1: float = 0.9  # AdamW first-moment decay (the usual default)
    beta2: float = 0.95  # AdamW second-moment decay; mHC paper, Table 5
    eps: float = 1e-8  # AdamW denominator epsilon (the usual default)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    # Connection parameters (mHC phi / alpha / bias, HC static and dynamic parts), for ablations (issue 15):
    connection_lr_mult: float = 1.0  # their LR = lr * this; 0 freezes them at their init
    connection_weight_decay: bool = True  # decay their matrices (mHC phi, HC dyn_proj); gates and biases never
    # their LR ramps linearly from 0 to full over this many steps, on top of the schedule (an upcycled connection's
    # warm-up; import-hf sets it); 0 = no ramp
    connection_warmup_steps: int = 0


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step (mHC paper: 0.316x at 80%, 0.1x at 90%) | constant
    warmup_steps: int = 20  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    step_milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # fractions of training
    step_factors: list[float] = field(default_factory=lambda: [0.316, 0.1])  # LR multipliers at the milestones
    # --- wsd (warmup-stable-decay): warm-up, constant peak, then a decay to min_lr_ratio ending at the last step ---
    decay_fraction: float = 0.2  # wsd: share of train.max_steps the decay takes (the last 20%, a common choice)
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt (Hagele et al. 2024: 1 - sqrt(progress))
    decay_start: int = 0  # wsd: step the decay starts (cool down from a constant-stage checkpoint); 0 = decay_fraction


@dataclass
class TrainConfig:
    seed: int = 0  # seeds model init and the data order
    max_steps: int = 200  # optimiser steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimiser step
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 autocast where the device supports it, CUDA)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model
    eval_every: int = 50  # steps between validation passes
    eval_batches: int = 8  # batches of the fixed held-out slice per validation
    diag_every: int = 50  # steps between stability diagnostics (spec section 7); 0 disables
    log_every: int = 10  # steps between metric lines
    skip_nonfinite: bool = False  # skip (and count) steps with a NaN/inf loss instead of stopping
    max_skipped_steps: int = 10  # stop anyway after this many skipped steps
    threads: int = 0  # torch CPU threads (at most the cores per local rank: train/threads.py); 0 leaves torch's default
    stop_at_step: int = 0  # exit cleanly (with a checkpoint) after this step, for time-sliced jobs; 0 = never
    dump_grads_at: int = 0  # debug: save the reduced, pre-clip gradients of this step by name to run_dir (any engine)
    progress: bool = True  # tqdm progress bar


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept (milestones are kept in addition)
    milestones: list[int] = field(default_factory=list)  # steps whose checkpoints are never deleted
    resume: str = "auto"  # auto (newest checkpoint in run_dir that verifies, if any) | never | a checkpoint path
    verify: bool = True  # check checkpoint digests on load; false also loads files written before digests existed
    overwrite: bool = False  # a fresh start in a run_dir holding another run moves that run aside (never deletes)
    save_final: bool = True  # write a checkpoint at the last step
    format: str = "auto"  # file (one self-contained file) | dcp (torch DCP shards, every rank) | auto (see below)
    async_save: bool = False  # dcp: write in the background while training goes on (committed once verified)
    # auto: dcp for the sharded torch engines (pipeline, fsdp), file for one process and DDP; deepspeed: its own


@dataclass
class LoggingConfig:
    wandb: bool = True  # log to wandb too (the JSONL file is always written)
    wandb_mode: str = "offline"  # offline (default, no account) | online | disabled
    wandb_project: str = "mhc-train"  # wandb project the runs are grouped under
    wandb_entity: str = ""  # wandb user or team; "" = the logged-in default


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO throughput settings (parallel.engine=deepspeed). The defaults are DeepSpeed's own, so a config
    without them trains as before; sizes are in elements (DeepSpeed's unit). configs/parallel/zero*.yaml say more."""

    overlap_comm: str = "auto"  # reduce grads during backward: on | off | auto (on under CUDA, else DS default)
    contiguous_gradients: bool = True  # copy gradients into one contiguous buffer as they are produced
    reduce_bucket_size: int = 500_000_000  # elements reduced in one gradient bucket
    allgather_bucket_size: int = 500_000_000  # ZeRO-1/2: elements gathered in one parameter bucket after the step
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO-3: elements of upcoming parameters fetched ahead
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3: parameters this small stay whole on every rank
    stage3_max_live_parameters: int = 1_000_000_000  # ZeRO-3: gathered elements kept before releasing
    stage3_max_reuse_distance: int = 1_000_000_000  # ZeRO-3: keep a gathered parameter reused within this distance


@dataclass
class ParallelConfig:
    engine: str = "none"  # data parallel across the launched ranks: none (one process) | ddp | fsdp (FSDP2) | deepspeed
    zero_stage: int = 1  # deepspeed ZeRO stage (1: optimizer states, 2: + gradients, 3: + parameters)
    deepspeed_config: str = ""  # a DeepSpeed JSON whose keys override the ones built from this config
    zero: ZeroConfig = field(default_factory=ZeroConfig)  # DeepSpeed's overlap and bucket settings
    pp: int = 1  # pipeline-parallel ranks (torch.distributed.pipelining); world = pp x dp (dp > 1 needs engine=fsdp)
    dp_replicate: int = 1  # engine=fsdp: replicas of the shards (HSDP: shard within a node, replicate across); 1: FSDP2
    pp_schedule: str = "1f1b"  # 1f1b | interleaved1f1b | zbv | dualpipev (V: two stages per rank) | csv
    pp_microbatches: int = 0  # micro-batches per optimiser step (split of train.batch_size); 0 = 2 * pp
    pp_overlap: bool = True  # dualpipev: run OVERLAP_F_B with our overlapping function (false: torch's, in order)
    pp_stages_per_rank: int = 0  # interleaved1f1b: stages per rank (0 = 2)
    pp_schedule_csv: str = ""  # pp_schedule=csv: a compute-only schedule file in torch's CSV format (row = rank)
    recompute: str = "none"  # none | mhc (drop and recompute connection intermediates; F kept) | full (F too)
    recompute_block: str = "auto"  # L_r in sites | auto (Eq. 20 optimum per pipeline stage) | stage (the paper's)
    timeout_s: int = 1800  # seconds a collective may wait before the process group aborts it (torch: 600)
    tp: int = 1  # tensor (+ sequence) parallel ranks, innermost on the mesh; data parallel = world / (pp x tp)
    cp: int = 1  # context parallel ranks: room on the mesh only (refused above 1: not built)
    ep: int = 1  # expert-parallel ranks (engine=fsdp, = the data-parallel size): experts sharded, tokens all-to-all


@dataclass
class Config:
    run_name: str = "run"  # a label for the run (metrics, wandb); also names the default run_dir
    run_dir: str = "runs/${run_name}"  # everything a run writes: metrics, checkpoints, config
    model: ModelConfig = field(default_factory=ModelConfig)  # the transformer's shape
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)  # the arm: residual, HC or mHC
    data: DataConfig = field(default_factory=DataConfig)  # the text and its preparation
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the learning-rate schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop: steps, batches, cadences
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving and resuming
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # wandb (the JSONL metrics are always written)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # data, pipeline and recompute parallelism
