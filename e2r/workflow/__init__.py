"""The workflow layer: what joins the models (``e2r`` core) and the memorybank (``stores``).

    configs     typed run configs (one dataclass per run kind; fields = CLI flags)
    trainer     the one training loop (Trainer + TrainTask hook), action statistics, DataLoaders
    train       train_teacher(cfg), train_student(cfg)
    evaluate    evaluate_teacher(cfg), evaluate_student(cfg) (+ KD gap)
    kd_data     camera windows + teacher targets read by key from the store, KD losses of a batch
    export      the export engine (each frame encoded once, shard-aligned tasks)
    export_plan frames/windows/batch cells of a split, decided before any model runs
    export_run  a whole export: schema, store, splits, dask, summary

Arrows: ``e2r`` core <- ``stores`` <- ``e2r.workflow`` <- ``pipelines`` <- ``bench`` (docs/ARCHITECTURE.md).
"""
