"""LLM work: requests and answers, real-time clients, provider batches, prices, the cache."""
