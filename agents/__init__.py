"""LongPilot role agents, SOP workflow, CLI and Python API.

from agents import Assistant
Assistant().run(base_model="smollm2-135m", target_context=16384, approve=True)
"""

from agents.api import Assistant, PlanResult, RunResult, RunStatus

__all__ = ["Assistant", "PlanResult", "RunResult", "RunStatus"]
