"""The merge job on Ray (docs/pipeline.md): config, stages, tasks, store, report, demo.

`job.py` runs the stages in order; each `*_stage.py` holds one stage, its
driver side and the Ray tasks it runs (given `stage_context.py` on the driver,
`task_context.py` in the workers); `scheduler.py` submits them to Ray;
`stages.py` records and verifies stage outputs (resume); `store.py` moves
folders in and out of the artifact store (local path or fsspec URI);
`report.py` writes the run report; `demo.py` runs the job and serves the bundle.
"""
