SPEC_VERSION: int
UNICODE_VERSION: str

class Normalizer:
    seed: int
    spec: str
    filler_words: tuple[str, ...]
    def __init__(self, filler_words: tuple[str, ...] = ...) -> None: ...
    def normalize(self, text: str) -> str: ...
    def fingerprint(self, text: str) -> tuple[str, bytes]: ...
