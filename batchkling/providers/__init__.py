"""The providers stage: speak each provider's HTTP API, and nothing else.

Owns the adapter interface (``base``), the ImaRouter and Kling native adapters, and the HTTP
layer they and the downloader share (``http``: httpx types over aiohttp, keeping the "sent or
not" distinction exactly-once needs).

May import: the foundation modules only. A provider never sees the store or the engine.
"""
