"""warmer: keeps LLM prompt caches warm for idle conversations."""
