"""Dataset versions that travel through object storage, and the worker-side cache that materializes them.

`format` (keys and the published-version manifest), `publish` (store -> repository, incremental, sharing the
backup's content-addressed objects), `materialize` + `cache` (a read-only folder per version on a worker,
LRU-capped, leased while a training reads it), `pins` + `retention` (which versions must stay), `resolve`
(a training run's one pinned version, for every attempt on any machine).
"""
