"""Benchmarks of `orders_pipeline`: the real pipeline end to end next to each stage's raw limit.

A package of its own, outside the product: it drives `orders_pipeline` only through what a
user of it has (`generator`, `pipeline.follow_queue` / `stage_queue` with their `on_batch`
hook, `pipeline.promote_staged`, `pipeline.refresh_all_views`, and the patterns' public
classes for its scratch measurements), and measures everything else itself. Run it as
`orders-pipeline-benchmark`, `python -m benchmarks` or `orders-pipeline benchmark`; see
BENCHMARKS.md.
"""
