"""linectl: a manufacturing line controller for station PLCs over Modbus TCP and OPC UA."""

__version__ = "0.1.0"
