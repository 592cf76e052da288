"""The structuring LLM of both profiles: GGUF models through llama.cpp, decoded in batches
under a JSON-schema grammar and grounded in what the vision models found (docs/models.md)."""
