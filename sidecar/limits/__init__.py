"""Limits: the sliding-window and budget engine (the public face of the compiled
``window`` module), its crash journal, and model prices."""
