"""Understanding requests: the deterministic request parser and the optional OpenAI-compatible LLM client."""
