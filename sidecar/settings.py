"""What every settings section is: a frozen table of the config file in which an unknown
key is an error, not ignored. Each capability declares its own sections (``settings`` in
its package); ``sidecar.config`` assembles them into the file and loads it."""
import msgspec


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A config table: frozen, and an unknown key is an error, not ignored."""
