"""The only layer with an event loop: server, connections, ledger, services, app wiring."""
