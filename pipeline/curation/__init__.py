"""Which examples survive: scorers (:mod:`.scoring`), strategies and immutable selection versions
(:mod:`.selection`), survivor shards (:mod:`.materialize`) and the paper's rounds (:mod:`.rounds`)."""
