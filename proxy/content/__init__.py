"""Content: the core, with no app wiring (the wiring is proxy/api/); the request path may import it."""
