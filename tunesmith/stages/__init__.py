"""One module per workflow rule: rule `x` runs `tunesmith.stages.x.run(io) -> Result`.

A stage module holds what the rule's files mean: it maps the rule's named inputs, outputs and
params (a StageIO) onto the domain modules' functions and returns a Result (metrics, histories,
artifacts, summary). The runner (tunesmith.runner) finds the module by the rule's name, calls
`run`, writes the tracking record and prints the one-line summary; the library below never sees
Snakemake, argv or MLflow. This module name is the registry: tunesmith.pipeline lists the rules in
order, and a rule's code digest (its rerun key) is traced from its stage module.

The data stages are also functions of paths (download, filter_rows, dedupe, ...), which tests and
bench/ call directly. Every data stage's Result holds ``load_seconds`` (tokenizer / model load),
``work_seconds`` (the rest) and ``seconds`` (both), and ``peak_rss_mb``: the process's peak
resident memory when the stage ended (its own under Snakemake, one job per process).

The per-row stages read and write parquet one batch at a time (tunesmith.data.batches), so their
memory does not grow with the rows: what they keep whole is a few numbers per row (token counts,
a 16-byte digest for exact dedupe, the positions select keeps; MinHash near-dedupe keeps a
signature a row, in its shard jobs' files). Two paths still hold every row: near-dedupe by
embedding (the embeddings need them) and a weighted mixture (download reads each source whole to
cap and tag it; format resamples the train rows in memory).
"""
