"""Trace-driven discrete-event simulator of cold starts that drives the real planner.

workload (arrivals), spec (cluster, models, stage times), engine (the event loop), report
(summaries), plot (attainment figure). Called by `hydraserve simulate` and the benchmarks.
"""
