"""Structured configs: the schema that every YAML under `configs/` is an instance of, and all validation.

- Hydra merges YAML into these dataclasses, so an unknown key or a wrong type fails before any work starts.
- Cross-field rules live in `validate_*` below, one place, and raise `ConfigError` naming the key, the value and
  what is allowed. Model code calls `validate_model` / `validate_connection` at build time too, so a model built
  from Python (no Hydra) gets the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mhc_train.errors import MhcTrainError

CONNECTION_TYPES = ("residual", "hc", "mhc")
H_RES_MODES = ("sinkhorn", "identity")
B_RES_INITS = ("uniform", "identity")
READ_INITS = ("uniform", "one_hot")
OUT_PROJ_INITS = ("none", "mul_sqrt_n", "div_sqrt_n")
BACKENDS = ("torch", "triton", "auto")
SINKHORN_BACKWARDS = ("unrolled", "implicit")
LR_SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("fp32", "bf16", "auto")
STREAM_DTYPES = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("none", "ddp", "fsdp", "deepspeed")  # data parallel across the launched ranks (parallel.engine)
PP_SCHEDULES = ("1f1b", "interleaved1f1b", "zbv", "dualpipev", "csv")
SPLIT_BACKWARD_SCHEDULES = ("zbv", "dualpipev")  # schedules that run input and weight gradients as separate actions
RECOMPUTE_MODES = ("none", "mhc", "full")
CHECKPOINT_FORMATS = ("auto", "file", "dcp")
WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(MhcTrainError, ValueError):
    """A config value is wrong; the message names the key, the value and what would work."""


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


@dataclass
class ConnectionConfig:
    type: str = "mhc"  # residual | hc | mhc
    n_streams: int = 4  # n, the expansion rate; residual forces 1
    backend: str = "auto"  # torch | triton | auto (triton for CUDA tensors, torch elsewhere)
    deterministic: bool = False  # kept for old configs: the triton phi gradient is always bit-reproducible now
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


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases, gates, HC static parts)
    beta1: float = 0.9
    beta2: float = 0.95  # mHC paper, Table 5
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    # Connection parameters (mHC phi / alpha / bias, HC static and dynamic parts), for ablations (issue 15):
    connection_lr_mult: float = 1.0  # their LR = lr * this; 0 freezes them at their init
    connection_weight_decay: bool = True  # decay their matrices (mHC phi, HC dyn_proj); gates and biases never


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step (mHC paper: 0.316x at 80%, 0.1x at 90%) | constant
    warmup_steps: int = 20  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    step_milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # fractions of training
    step_factors: list[float] = field(default_factory=lambda: [0.316, 0.1])  # LR multipliers at the milestones


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
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
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
    # auto: dcp for the sharded torch engines (pipeline, fsdp), file for one process and DDP; deepspeed: its own


@dataclass
class LoggingConfig:
    wandb: bool = True  # log to wandb too (the JSONL file is always written)
    wandb_mode: str = "offline"  # offline (default, no account) | online | disabled
    wandb_project: str = "mhc-train"
    wandb_entity: str = ""


@dataclass
class ParallelConfig:
    engine: str = "none"  # data parallel across the launched ranks: none (one process) | ddp | fsdp (FSDP2) | deepspeed
    zero_stage: int = 1  # deepspeed ZeRO stage (1: optimizer states, 2: + gradients, 3: + parameters)
    deepspeed_config: str = ""  # a DeepSpeed JSON whose keys override the ones built from this config
    pp: int = 1  # pipeline-parallel ranks (torch.distributed.pipelining); world = pp x dp (dp > 1 needs engine=fsdp)
    pp_schedule: str = "1f1b"  # 1f1b | interleaved1f1b | zbv | dualpipev (V: two stages per rank) | csv
    pp_microbatches: int = 0  # micro-batches per optimiser step (split of train.batch_size); 0 = 2 * pp
    pp_overlap: bool = True  # dualpipev: run OVERLAP_F_B with our overlapping function (false: torch's, in order)
    pp_stages_per_rank: int = 0  # interleaved1f1b: stages per rank (0 = 2)
    pp_schedule_csv: str = ""  # pp_schedule=csv: a compute-only schedule file in torch's CSV format (row = rank)
    recompute: str = "none"  # none | mhc (drop and recompute connection intermediates; F kept) | full (F too)
    recompute_block: str = "auto"  # L_r in sites | auto (Eq. 20 optimum per pipeline stage) | stage (the paper's)


@dataclass
class Config:
    run_name: str = "run"
    run_dir: str = "runs/${run_name}"  # everything a run writes: metrics, checkpoints, config
    model: ModelConfig = field(default_factory=ModelConfig)
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(key, value, f"allowed values are {', '.join(choices)}")


def at_least(key: str, value: Any, low: float, kind: type = int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value < low:
        fail(key, value, f"must be {'an integer' if kind is int else 'a number'} >= {low}")


def validate_data(d: DataConfig) -> None:
    """The data.* checks, also run by `prepare` on a DataConfig built without a full Config."""
    if not 0 < d.val_fraction < 1:
        fail("data.val_fraction", d.val_fraction, "must be in (0, 1)")
    at_least("data.vocab_size", d.vocab_size, 16)
    at_least("data.num_workers", d.num_workers, 1)
    at_least("data.tokenizer_sample_lines", d.tokenizer_sample_lines, 1)
    at_least("data.shard_tokens", d.shard_tokens, 1024)
    choice("data.verify", d.verify, ("size", "digest"))


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    for key in ("vocab_size", "dim", "n_layer", "n_head", "max_seq_len", "multiple_of"):
        at_least(f"{prefix}.{key}", getattr(m, key), 1)
    at_least(f"{prefix}.n_kv_head", m.n_kv_head, 0)
    at_least(f"{prefix}.ffn_hidden_dim", m.ffn_hidden_dim, 0)
    at_least(f"{prefix}.head_dim", m.head_dim, 0)
    choice(f"{prefix}.stream_dtype", m.stream_dtype, STREAM_DTYPES)
    if not m.head_dim and m.dim % m.n_head:
        fail(f"{prefix}.n_head", m.n_head, f"must divide {prefix}.dim={m.dim} (or set {prefix}.head_dim)")
    if (m.head_dim or m.dim // m.n_head) % 2:
        fail(f"{prefix}.head_dim", m.head_dim or m.dim // m.n_head, "the head size must be even for RoPE")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        fail(f"{prefix}.n_kv_head", m.n_kv_head, f"must divide {prefix}.n_head={m.n_head} (or be 0)")
    if not (m.norm_eps > 0 and m.init_std > 0 and m.rope_theta > 0):
        fail(f"{prefix}.norm_eps/init_std/rope_theta", (m.norm_eps, m.init_std, m.rope_theta), "must all be > 0")


def validate_connection(c: ConnectionConfig, prefix: str = "connection") -> None:
    choice(f"{prefix}.type", c.type, CONNECTION_TYPES)
    choice(f"{prefix}.backend", c.backend, BACKENDS)
    at_least(f"{prefix}.n_streams", c.n_streams, 1)
    if c.type == "residual" and c.n_streams != 1:
        fail(f"{prefix}.n_streams", c.n_streams, "the residual baseline has exactly 1 stream; set it to 1")
    choice(f"{prefix}.hc_out_proj_init", c.hc_out_proj_init, OUT_PROJ_INITS)
    choice(f"{prefix}.h_res", c.h_res, H_RES_MODES)
    choice(f"{prefix}.b_res_init", c.b_res_init, B_RES_INITS)
    choice(f"{prefix}.read_init", c.read_init, READ_INITS)
    choice(f"{prefix}.sinkhorn_backward", c.sinkhorn_backward, SINKHORN_BACKWARDS)
    at_least(f"{prefix}.t_max", c.t_max, 1)
    if not c.eps > 0:
        fail(f"{prefix}.eps", c.eps, "must be > 0")
    if c.phi_init_std < 0 or c.hc_dynamic_scale_init < 0:
        fail(f"{prefix}.phi_init_std/hc_dynamic_scale_init", (c.phi_init_std, c.hc_dynamic_scale_init), "must be >= 0")


# Rules that need knowledge of a higher layer (the pipeline's schedule files, the launched world) are registered by
# that layer (mhc_train.parallel registers its own on import), so this module imports nothing of mhc_train.
_RULES: list = []
_WORLD_RULES: list = []


def register_rules(rules=None, world_rules=None) -> None:
    """Add `rules(cfg)` to `validate` and `world_rules(cfg, world)` to `validate_world` (each once)."""
    for registry, fn in ((_RULES, rules), (_WORLD_RULES, world_rules)):
        if fn is not None and fn not in registry:
            registry.append(fn)


def validate_world(cfg: Config, world: int) -> None:
    """Rules that need the launched world size (registered by mhc_train.parallel); called before the process group
    starts."""
    for rule in _WORLD_RULES:
        rule(cfg, world)


def validate(cfg: Config) -> None:
    """Every cross-field rule of a full run config; raises ConfigError on the first violation."""
    validate_model(cfg.model)
    validate_connection(cfg.connection)
    t, o, s = cfg.train, cfg.optim, cfg.schedule
    for key in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every"):
        at_least(f"train.{key}", getattr(t, key), 1)
    at_least("train.diag_every", t.diag_every, 0)
    at_least("train.stop_at_step", t.stop_at_step, 0)
    choice("train.precision", t.precision, PRECISIONS)
    if cfg.model.stream_dtype == "bf16" and t.precision == "fp32":
        fail("model.stream_dtype", "bf16", "bf16 streams need bf16 compute: set train.precision=bf16 (or auto on CUDA)")
    choice("train.device", t.device, DEVICES)
    if t.seq_len > cfg.model.max_seq_len:
        fail("train.seq_len", t.seq_len, f"must be <= model.max_seq_len={cfg.model.max_seq_len}")
    if not o.lr > 0:
        fail("optim.lr", o.lr, "must be > 0")
    if o.weight_decay < 0 or o.grad_clip < 0:
        fail("optim.weight_decay/grad_clip", (o.weight_decay, o.grad_clip), "must be >= 0")
    if o.connection_lr_mult < 0:
        fail("optim.connection_lr_mult", o.connection_lr_mult, "must be >= 0 (0 freezes the connection parameters)")
    choice("schedule.name", s.name, LR_SCHEDULES)
    at_least("schedule.warmup_steps", s.warmup_steps, 0)
    if len(s.step_milestones) != len(s.step_factors):
        fail("schedule.step_factors", list(s.step_factors), "needs one factor per schedule.step_milestones entry")
    if list(s.step_milestones) != sorted(s.step_milestones) or any(not 0 < m < 1 for m in s.step_milestones):
        fail("schedule.step_milestones", list(s.step_milestones), "must be increasing fractions in (0, 1)")
    if not 0 <= s.min_lr_ratio <= 1:
        fail("schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")
    at_least("checkpoint.every", cfg.checkpoint.every, 0)
    at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    choice("checkpoint.format", cfg.checkpoint.format, CHECKPOINT_FORMATS)
    if cfg.parallel.engine == "deepspeed" and cfg.checkpoint.format == "dcp":
        fail("checkpoint.format", "dcp", "parallel.engine=deepspeed writes its own sharded checkpoints: use auto")
    choice("parallel.recompute", cfg.parallel.recompute, RECOMPUTE_MODES)
    choice("parallel.engine", cfg.parallel.engine, ENGINES)
    at_least("parallel.pp", cfg.parallel.pp, 1)
    choice("parallel.pp_schedule", cfg.parallel.pp_schedule, PP_SCHEDULES)
    if cfg.parallel.zero_stage not in (1, 2, 3):
        fail("parallel.zero_stage", cfg.parallel.zero_stage, "allowed values are 1, 2, 3")
    p = cfg.parallel
    if p.engine == "deepspeed" and p.zero_stage == 3 and p.recompute != "none":
        fail(
            "parallel.recompute",
            p.recompute,
            "ZeRO-3 gathers a module's partitioned parameters only inside that module's forward, and recomputation "
            "re-runs the sites inside the backward, outside it: use recompute=none with zero_stage=3, or "
            "parallel.engine=fsdp (parameters sharded too) with recompute=mhc or full",
        )
    if cfg.parallel.engine == "deepspeed" and t.skip_nonfinite:
        fail("train.skip_nonfinite", True, "is not supported with parallel.engine=deepspeed (it always steps)")
    block = str(cfg.parallel.recompute_block)
    if block not in ("auto", "stage") and not (block.isdigit() and int(block) >= 1):
        fail("parallel.recompute_block", block, "must be a positive number of connection sites, auto or stage")
    choice("logging.wandb_mode", cfg.logging.wandb_mode, WANDB_MODES)
    validate_data(cfg.data)
    for rule in _RULES:
        rule(cfg)


def config_dir() -> str:
    """The `configs/` tree: $MHC_TRAIN_CONFIG_DIR, else the copy a wheel installs as the package `mhc_train.configs`
    (mhc_train/configs/), else the repository's (a source checkout or an editable install)."""
    import os
    from pathlib import Path

    override = os.environ.get("MHC_TRAIN_CONFIG_DIR")
    if override:
        if not Path(override).is_dir():
            raise ConfigError(f"MHC_TRAIN_CONFIG_DIR={override!r} is not a directory: point it at a configs/ tree")
        return os.path.abspath(override)  # Hydra wants an absolute path
    here = Path(__file__).resolve().parent
    candidates = (here / "configs", here.parent / "configs")  # installed wheel, then source tree
    for d in candidates:
        if (d / "config.yaml").is_file():
            return str(d)
    raise ConfigError(
        f"no configs/ tree found (looked for config.yaml in {candidates[0]} and {candidates[1]}): reinstall mhc-train "
        "or set MHC_TRAIN_CONFIG_DIR to a configs/ directory"
    )


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


# --- key and type checks with one-line messages (run before Hydra, whose own advice misleads: "use +key") ---


def _fields(schema: type) -> dict:
    import dataclasses

    return {f.name: f for f in dataclasses.fields(schema)}


def _hints(schema: type) -> dict:
    import typing

    return typing.get_type_hints(schema)


def _sub_schema(schema: type, name: str) -> type | None:
    import dataclasses

    hint = _hints(schema).get(name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _expected(hint: Any, key: str) -> str:
    import dataclasses
    import typing

    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"a mapping of {key}.* keys"
    if typing.get_origin(hint) is list:
        item = (typing.get_args(hint) or (None,))[0]
        return {int: "a list of integers", float: "a list of numbers", str: "a list of strings"}.get(item, "a list")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _literal(value: Any) -> str:
    """A value as it is written in an override (true, [0.8,0.9])."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    return str(value)


def _default(schema: type, name: str) -> Any:
    import dataclasses

    f = _fields(schema)[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _unknown_key(segments: list[str], i: int, schema: type, where: str = "", groups: tuple = ()) -> ConfigError:
    """`segments[i]` is no key of `schema` (the level that `segments[:i]` names); `groups` are the config groups that
    are not schema keys (top level only). Suggests the closest spelling, never Hydra's `+key`, which cannot work."""
    import difflib

    def best(seg: str, level: type, extra: tuple = ()) -> str | None:
        names = [*_fields(level), *extra]
        return seg if seg in names else next(iter(difflib.get_close_matches(seg, names, n=1, cutoff=0.6)), None)

    prefix = ".".join(segments[: i + 1])
    head = f"unknown config key {'.'.join(segments)}{where}"
    first = best(segments[i], schema, groups if i == 0 else ())
    if first is not None and first in groups:
        return ConfigError(f"{head}; did you mean the config group {first}? (select one of its files: +{first}=NAME)")
    if first is not None:  # correct the rest of the path too where every later segment has a close match
        fixed, level = [*segments[:i], first], _sub_schema(schema, first)
        for seg in segments[i + 1 :]:
            match = best(seg, level) if level is not None else None
            if match is None:  # the rest is beyond repair: name only the first wrong key
                return ConfigError(f"unknown config key {prefix}{where}; did you mean {'.'.join(fixed[: i + 1])}?")
            fixed.append(match)
            level = _sub_schema(level, match)
        return ConfigError(f"{head}; did you mean {'.'.join(fixed)}?")
    if i > 0:  # a key of another section (schedule.step_milestones written as train.step_milestones)
        elsewhere = [
            f"{name}.{match}"
            for name in _fields(Config)
            if (sub := _sub_schema(Config, name)) is not None and sub is not schema
            for match in difflib.get_close_matches(segments[i], list(_fields(sub)), n=1, cutoff=0.8)
        ]
        if elsewhere and i == len(segments) - 1:
            return ConfigError(f"{head}; {'.'.join(segments[:i])} has no such key; did you mean {elsewhere[0]}?")
    level_name = ".".join(segments[:i]) or "the top level"
    known = [*_fields(schema), *(groups if i == 0 else ())]
    return ConfigError(
        f"unknown config key {prefix}{where}; {level_name} has no such key (known keys: {', '.join(known)})"
    )


class _Checker:
    """Checks a value against the schema's type with OmegaConf's own conversion rules (so '5' is an integer and
    ${model.vocab_size} is accepted), one scratch node per schema class."""

    def __init__(self):
        self._nodes: dict = {}

    def __call__(self, schema: type, name: str, value: Any, key: str, where: str = "", example: bool = True) -> None:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        node = self._nodes.get(schema)
        if node is None:
            node = self._nodes[schema] = OmegaConf.structured(schema)
        try:
            node[name] = value
        except OmegaConfBaseException:
            expected = _expected(_hints(schema)[name], key)
            sub = _sub_schema(schema, name)
            if sub is not None and isinstance(value, str) and not example:
                fix = f"a config group is chosen on the command line, {key}={value}, not in a file"
            elif sub is not None:
                fix = f"set its keys one by one, e.g. {key}.{next(iter(_fields(sub)))}=..."
            elif example:
                fix = f"e.g. {key}={_literal(_default(schema, name))}"
            else:
                fix = f"the default is {_literal(_default(schema, name))}"
            raise ConfigError(f"{key} expects {expected}, got {value!r}{where} ({fix})") from None


def _check_overrides(overrides: list[str], cfg_dir: str) -> None:
    """Every override names a schema key (or a config group and one of its files) and its value has the key's type."""
    import difflib
    import typing
    from pathlib import Path

    from hydra.core.override_parser.overrides_parser import OverridesParser

    check = _Checker()
    root = Path(cfg_dir)
    groups = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in _fields(Config)))
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.is_delete() or o.is_sweep_override() or o.package is not None or key.split(".")[0] == "hydra":
            continue  # deletions, sweeps, @package moves and Hydra's own keys: Hydra decides
        group = root.joinpath(*key.replace(".", "/").split("/"))
        if group.is_dir():  # a config group: the value names one of its YAML files
            value = o.value()
            if key in groups and not (o.is_add() or o.is_force_add()):
                raise ConfigError(
                    f"config group {key} is not in the defaults list of config.yaml: select it with "
                    f"+{key}={o.get_value_element_as_str()}"
                )
            if isinstance(value, str) and not (group / f"{value}.yaml").is_file():
                options = sorted(str(p.relative_to(group).with_suffix("")) for p in group.rglob("*.yaml"))
                close = difflib.get_close_matches(value, options, n=1)
                hint = f"did you mean {key}={close[0]}? " if close else ""
                raise ConfigError(
                    f"config group {key} has no option {value!r} (no {group / value}.yaml); "
                    f"{hint}available: {', '.join(options)}"
                )
            continue
        if "/" in key:
            continue  # a nested group path that does not exist: Hydra's message names it
        segments, schema = key.split("."), Config
        for i, seg in enumerate(segments):
            if seg not in _fields(schema):
                raise _unknown_key(segments, i, schema, groups=groups)
            if i == len(segments) - 1:
                check(schema, seg, o.value(), key)
                break
            sub = _sub_schema(schema, seg)
            if sub is None:
                hint, leaf = _hints(schema)[seg], ".".join(segments[: i + 1])
                if typing.get_origin(hint) is list:
                    break  # a list index: OmegaConf decides
                raise ConfigError(
                    f"{leaf} is a single value ({_expected(hint, leaf)}), not a section: write {leaf}=..."
                )
            schema = sub


def _reject_unknown_keys(
    node: dict, schema: type, prefix: str = "", where: str = "", check: _Checker | None = None
) -> None:
    """Every key of `node` (nested dicts) is a key of the schema; with `check`, every leaf value has its type too."""
    fields = _fields(schema)
    for key, value in node.items():
        key = str(key)
        path = f"{prefix}{key}"
        if "." in key:
            head, _, rest = key.partition(".")
            raise ConfigError(
                f"config key {path!r}{where} contains a dot: nest it instead ({prefix}{head}: {{{rest}: ...}})"
            )
        if key not in fields:
            raise _unknown_key(path.split("."), path.count("."), schema, where)
        sub = _sub_schema(schema, key)
        if isinstance(value, dict) and sub is not None:
            _reject_unknown_keys(value, sub, f"{path}.", where, check)
        elif check is not None:
            check(schema, key, value, path, where, example=False)


def _read_config_file(path: str):
    """The `--config` YAML as a DictConfig whose keys and value types match the schema; a ConfigError naming the
    file and the problem otherwise (missing, a directory, unreadable, invalid YAML, not a mapping)."""
    from pathlib import Path

    import yaml
    from omegaconf import OmegaConf

    try:
        from omegaconf._utils import get_yaml_loader  # OmegaConf's loader: what OmegaConf.load would parse

        loader = get_yaml_loader()
    except ImportError:  # pragma: no cover - an OmegaConf without it
        loader = yaml.SafeLoader
    p = Path(path)
    name = f"config file {path}"
    if p.is_dir():
        inside = sorted(x.name for x in p.glob("*.y*ml"))
        fix = f"pass one of its files, e.g. --config {p / inside[0]}" if inside else "pass the path of a YAML file"
        raise ConfigError(f"{name} is a directory, not a YAML file: {fix}")
    if not p.exists():
        cwd = "" if p.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"{name} does not exist{cwd}: check the path")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{name} is not valid YAML: {problem}{at}; fix the syntax there") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name} is not UTF-8 text (invalid byte at offset {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{name} cannot be read: {e.strerror or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name} must hold a mapping of config keys (e.g. 'train: {{max_steps: 100}}'), got {type(data).__name__} "
            f"{_literal(data)[:60]!r}"
        )
    _reject_unknown_keys(data, Config, where=f" in {path}", check=_Checker())
    return OmegaConf.create(data)


def _one_line(msg: str) -> str:
    """Hydra's multi-line messages as one line, without its search-path dump and its `+key` advice."""
    import re

    msg = msg.split("\nConfig search path")[0]
    msg = re.sub(r"\s*To append to your config use \+\S+", "", msg)
    return "; ".join(line.strip() for line in msg.splitlines() if line.strip())


def load_config(overrides: list[str] | None = None, config_file: str | None = None, config_name: str = "config"):
    """Compose `configs/<config_name>.yaml` with Hydra overrides, merge an optional YAML file on top, check the schema
    (unknown keys and wrong types fail here, naming the key), validate, and return a `Config` dataclass."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    GlobalHydra.instance().clear()
    cfg_dir = config_dir()
    try:
        file_cfg = _read_config_file(config_file) if config_file else None
        _check_overrides(list(overrides or []), cfg_dir)
        with initialize_config_dir(config_dir=cfg_dir, version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        if file_cfg is not None:
            cfg = OmegaConf.merge(cfg, file_cfg)
        _reject_unknown_keys(OmegaConf.to_container(cfg, resolve=False), Config)  # `+key=...` bypasses struct mode
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config error: {_one_line(str(e))}") from e
    except ConfigError:
        raise
    except Exception as e:  # hydra's own errors (bad override syntax, a missing group file)
        if type(e).__module__.startswith("hydra"):
            raise ConfigError(f"config error: {_one_line(str(e))}") from e
        raise
    validate(obj)
    return obj


def to_dict(cfg: Config) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
