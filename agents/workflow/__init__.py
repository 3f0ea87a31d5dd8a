"""Run machinery: the langgraph graph with its gates and approval, the run lock, background runs, file helpers."""
