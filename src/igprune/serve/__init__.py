"""`igprune serve`: an OpenAI-compatible HTTP server for a routed, pruned model (needs the `serve` extra).

app.py holds the HTTP side (endpoints, errors, metrics), engine.py the scheduler and the generation
thread, schemas.py the request bodies.
"""

from igprune.serve.app import BackgroundServer, ServeSettings, create_app, serve

__all__ = ["BackgroundServer", "ServeSettings", "create_app", "serve"]
