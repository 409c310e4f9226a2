"""Planning tools, test oracles and measurement helpers: not part of the product package (`mhc_train`), not shipped
in its wheel, but tested like it (tests/) and used by `scripts/`.

- `measure`: step time and bytes saved for backward (the benchmark scripts, tests);
- `memory_model`: the per-token activation-memory model under each recompute mode (Eq. 20);
- `pipeline_sim`: a discrete-event simulator of the pipeline schedules;
- `deepspeed_pipeline`: the same model on DeepSpeed's own PipelineModule, an independent oracle for our pipeline.
"""
