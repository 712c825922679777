"""Connectors: sources and sinks for real external systems.

Each lives in a module of its own and imports its client library only when imported, so
``import pipeflow`` never needs them:

- :mod:`pipeflow.connectors.redis` — Redis Streams consumer groups: one pipeline as a
  fleet of processes, at-least-once (``pip install 'pipeflow-trio[redis]'``).
"""
