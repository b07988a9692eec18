"""Side-by-side benchmarks: training arms (:mod:`.train`) and data loaders (:mod:`.data`)."""
