"""The merge job on Ray (docs/pipeline.md): config, stages, tasks, store, report, demo.

`job.py` runs the stages in order; `tasks.py` holds what each Ray task does;
`stages.py` records and verifies stage outputs (resume); `store.py` moves
folders in and out of the artifact store (local path or fsspec URI);
`report.py` writes the run report; `demo.py` runs the job and serves the bundle.
"""
