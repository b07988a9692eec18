"""Decisions about examples: sources, ingest, (later) scoring and selection, inspection, the CLI.

Every heavy step runs as Ray tasks. Depends on ``shards``; never the other way round.
"""
