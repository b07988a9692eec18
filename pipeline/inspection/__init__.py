"""What a person asks of a dataset and its selections: summaries (:mod:`.dataset`), lineage and
diffs (:mod:`.selections`), pictures (:mod:`.plots`) and SQL over the tables (:mod:`.sql`)."""
