"""Placement service: cluster model, SLO-driven planner, backends, trace-driven simulator."""
