"""The results output, written by the sink (``store``) and read by ``imgflow export csv``,
the backfill skip check and ``imgflow run``'s progress (``reader``).

An output is a local folder or an ``s3://BUCKET/PREFIX/``; both hold the same keys, the
Kafka Connect S3 sink's layout::

    avro/<topic>/partition=<p>/<topic>+<p>+<first offset>.avro   the rows of one sink batch
    _index/<topic>/partition=<p>/<same name>.ids                   their event_ids (JSON, small)
    results.csv (+ .results.csv.committed)                         local: one CSV, appended
    csv/<topic>/partition=<p>/<same name>.csv                      S3: one CSV part per Avro file

Every object is written whole (local: temp file + rename; S3: one PUT) under a
deterministic name, so a retried write overwrites the same key. The ``_index`` object of a
batch is written last: it marks the batch complete (its Avro file and CSV rows are all
there). The leading ``_`` makes Spark/Hive-style readers skip it. The long story:
docs/output.md and consumers/sink.py.
"""
