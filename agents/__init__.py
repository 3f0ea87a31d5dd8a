"""LongPilot role agents, SOP workflow, CLI and Python API (the SOP-driven agents arrive with the agents issue)."""
