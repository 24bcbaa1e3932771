"""The two-tower retrieval model: towers, training by replaying the log, registry, offline metrics.

- ``model.two_tower``: feature hashing, the torch towers and ``TwoTowerModel``
  (``encode_user(ctx)``, ``encode_items(records)``), fast on CPU;
- ``model.data``: the training log, read from the interactions topic or the
  Parquet archive behind one function (``read_interactions``);
- ``model.train``: seeded, deterministic training (in-batch softmax, log-Q);
- ``model.registry``: artefacts on disk and the live version in Redis;
- ``model.evaluate``: offline recall of every candidate source on a time split;
- ``model.worker``: the trainer process that answers refresh commands.
"""
