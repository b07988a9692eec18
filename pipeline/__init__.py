"""Decisions about examples, in the data layer. Depends on ``shards`` (and on ``trainer`` only to
reuse the model for scoring); never the other way round.

Subpackages, one job each:

* :mod:`pipeline.ingest` - sources (digits, mnist5k, synthetic, imagefolder, cifar, datasets) to
  shards, one Ray task per output shard;
* :mod:`pipeline.curation` - scoring, selection strategies, the paper's rounds, survivor shards;
* :mod:`pipeline.inspection` - what a person asks: summaries, lineage, diffs, pictures, SQL;
* :mod:`pipeline.bench` - side-by-side benchmarks (training arms, data loaders);
* :mod:`pipeline.cli` - the ``onion`` command: one module per command, parsing only.

:mod:`pipeline.ray_runtime` starts or joins Ray; library functions expect it started when they
need it (the CLI starts it).
"""
