"""`overnight serve`: OpenAI's Files and Batches API and Anthropic's Message Batches API over
overnight's own backends.

Every batch is one or more jobs in the ledger, run in the server's background and resumed when
the server starts again (batches.py; Anthropic's shapes in anthropic.py); files live in a
folder with a small catalogue (files.py, catalogue.py); serve.toml is read by config.py, API
keys by auth.py, and app.py holds the HTTP routes. The real-time endpoints are realtime.py,
over a micro-batcher per model (microbatch.py).
"""
