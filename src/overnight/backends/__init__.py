"""Backends: predictors that run in the process (the local model, python functions, self-hosted
LLMs). The providers' APIs are in llm/."""
