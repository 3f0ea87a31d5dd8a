"""Understanding requests: the deterministic request parser and the optional OpenAI-compatible LLM client; and the
command line's names for Spec's fields (flags), which the CLI parses and the planner's alternatives write."""
