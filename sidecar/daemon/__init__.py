"""The daemon: the composition root (``service``), the socket server, and the op handlers
that put the engines together. Nothing below this package imports it."""
