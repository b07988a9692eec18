"""Sources to shards: readers of each input kind (:mod:`.sources`), image checks and encoding
(:mod:`.encode`) and the Ray job that writes shards, index and manifest (:mod:`.job`)."""
