"""``atmoe.serve``: compositions behind an OpenAI-compatible HTTP API (``atmoe-reg serve``).

Layers, bottom up: ``sampling`` / ``text`` / ``kv`` (pure helpers), ``engine`` (the batching
worker), ``backends`` (what a worker runs: a composition, a plain model, PEFT's mixed batch),
``pool`` (catalog references to loaded models, a bounded LRU), ``protocol`` (the request bodies),
``app`` (the FastAPI application) and ``catalog`` (the read-only catalog page's JSON). The server
depends on ``atmoe`` and ``atmoe.registry``; nothing below it imports it. FastAPI and uvicorn are
the ``serve`` extra.
"""
