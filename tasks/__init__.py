"""Prefect tasks, thin wrappers around saliency/: plan_shards (tasks.plan), explain_shard (tasks.explain,
on the Ray actors of tasks.actor, which write their own parts with tasks.write), aggregate
(tasks.aggregate), track_mlflow (tasks.tracking) and render_report (tasks.report_run).

Nothing is imported here, so that Ray actors importing tasks.actor do not load Prefect.
"""
