"""`train.threads` is clamped to the cores per local rank, with one warning, where it would oversubscribe the node;
what fits is used as given."""

import logging

from mhc_train.train import threads


def test_threads_are_clamped_to_the_cores_per_local_rank_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=threads.logger.name):
        assert threads.cpu_threads(2, {"LOCAL_WORLD_SIZE": "2"}) == 1  # 2 threads x 2 ranks on 2 cores
        assert threads.cpu_threads(2, {"LOCAL_WORLD_SIZE": "2"}) == 1
        assert threads.cpu_threads(4, {"LOCAL_WORLD_SIZE": "4"}) == 1  # more ranks than cores: one thread each
    warnings = [r.getMessage() for r in caplog.records if "oversubscribes" in r.getMessage()]
    assert len(warnings) == 2 and "train.threads=2 x 2 rank(s)" in warnings[0], warnings  # once per setting
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=threads.logger.name):
        assert threads.cpu_threads(1, {"LOCAL_WORLD_SIZE": "2"}) == 1
        assert threads.cpu_threads(2, {}) == 2  # alone on 2 cores: as given
    assert not caplog.records


def test_the_trainer_sets_the_clamped_count(monkeypatch):
    import torch

    from mhc_train.train import trainer

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(trainer, "init_distributed", stop)  # the thread count is set before the process group
    from mhc_train.config import load_config

    cfg = load_config(["train.threads=2"])
    try:
        trainer.Trainer(cfg)
    except Stop:
        pass
    assert seen == [1], seen
