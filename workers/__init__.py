"""Reference services, run from the repository root: ``zrpc worker run workers.echo:Echo``.

An import package used from the checkout, not installed. Each service imports only ``zrpc``'s
public API and its own generated ``*_pb2`` module.
"""
