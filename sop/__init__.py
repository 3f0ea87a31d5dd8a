"""Encoded standard operating procedures, artifact schemas and verification checks (arrive with the agents issue)."""
