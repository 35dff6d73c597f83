"""The wire: the request and reply structs of the protocol, their framing on the Unix
socket, and the peer credentials both ends check. Depends on nothing else in sidecar."""
