"""linectl's exception tree.

Library errors (pymodbus, asyncua, SQLAlchemy, YAML) are translated once, at the module that
talks to the library, into one of these, chained with ``raise ... from exc``. Every message
names the thing at fault and where it is: the config path, or the PLC, its address, the station
and the register or node.
"""

from __future__ import annotations


class LinectlError(Exception):
    """Base of every error linectl raises on purpose."""


class ConfigError(LinectlError):
    """A line config that cannot be used. Holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PlcError(LinectlError):
    """Something went wrong between linectl and a PLC."""

    def __init__(self, message: str, *, plc: str = "", station: str | None = None) -> None:
        super().__init__(message)
        self.plc = plc
        self.station = station


class PlcConnectionLost(PlcError):
    """The connection to a PLC is gone (refused, reset, half-open, frozen heartbeat)."""


class PlcTimeout(PlcError):
    """A request to a PLC got no answer within its deadline."""


class ProtocolViolation(PlcError):
    """A PLC showed a value outside the station contract (docs/plc-interface.md)."""


class CommandRefused(PlcError):
    """The PLC evaluated a command and refused it (wrong state, unknown code, bad unit)."""


class StoreError(LinectlError):
    """The trace store cannot open its database, or failed to record or read the trace."""


class LeaseHeld(StoreError):
    """Another live process owns the line (``linectl run`` on a line that is running)."""


class LeaseLost(StoreError):
    """This process no longer owns its line: it must command nothing and write nothing."""
