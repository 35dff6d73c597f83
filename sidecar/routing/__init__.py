"""Routing: model chains for a request, downgrades near a budget, and circuit breakers."""
