"""The line model: one YAML file describes a line, and every part of linectl reads it.

Structure is validated by pydantic; references between parts (stations in the flow, PLCs of
stations, addresses on a PLC) are checked afterwards by ``_check_references`` so that each
problem is reported as one line naming the file, the line number, the path inside the file
and the fix.
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from linectl.contract import MODBUS_MAX_READ, block_words
from linectl.errors import ConfigError

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"


def _check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    # A name ending in an all-digit label is a mistyped IPv4 address (127.0.0.256, 10.0.0),
    # not a host name (RFC 3696 section 2); the resolver would read 10.0.0 as 10.0.0.0.
    if not _HOSTNAME.match(host) or host.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"'{host}' is not an IP address or host name")
    return host


class _Model(BaseModel):
    # A misspelt key is an error, not a silently ignored setting; .inf and .nan are no numbers
    # of a line (a cycle of .inf s would pass here and overflow in analyze and run).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Connection(_Model):
    """Deadlines and reconnect settings common to both protocols."""

    timeout_s: float = Field(1.0, gt=0, description="Deadline of one request.")
    connect_timeout_s: float = Field(3.0, gt=0, description="Deadline of one connect attempt.")
    heartbeat_timeout_s: float = Field(
        3.0, gt=0, description="A heartbeat frozen this long counts as a lost connection."
    )
    backoff_initial_s: float = Field(0.2, gt=0, description="First reconnect delay.")
    backoff_max_s: float = Field(10.0, gt=0, description="Longest reconnect delay.")


class ModbusSimTls(_Model):
    """What the bundled simulator presents when it serves Modbus/TCP Security; linectl itself
    never reads this (like a station's ``sim``)."""

    certificate: Path = Field(description="The simulated PLC's certificate (PEM or DER).")
    private_key: Path = Field(description="Its private key (PEM, unencrypted).")
    client_ca: Path = Field(description="CA (PEM or DER) that must have issued client certs.")

    @field_validator("certificate", "private_key", "client_ca")
    @classmethod
    def _paths(cls, path: Path, info: ValidationInfo) -> Path:
        return _relative_to_config(path, info)


class _ClientTls(_Model):
    """What linectl connects over TLS with (``linectl.tls.client_context``): the peer's
    certificate is verified against ``ca`` and must name ``server_hostname`` (default: the
    host; an IP address matches an IP subjectAltName). A key password never is in the file:
    name the environment variable that holds it."""

    ca: Path = Field(description="CA or trusted certificates (PEM or DER) to verify the peer.")
    certificate: Path | None = Field(None, description="Our client certificate (PEM or DER).")
    private_key: Path | None = Field(None, description="Its private key (PEM).")
    private_key_password_env: str | None = Field(
        None, description="Environment variable holding the key's password, if it is encrypted."
    )
    server_hostname: str | None = Field(
        None, description="Name or IP the peer's certificate must carry (default: host)."
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        "TLSv1.2", description="Oldest TLS version accepted."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"password", "private_key_password"} & set(data):
            raise ValueError(
                "a key password must not be written in the config; put it in an environment "
                "variable named by private_key_password_env"
            )
        return data

    @field_validator("ca", "certificate", "private_key")
    @classmethod
    def _paths(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _relative_to_config(path, info)

    @field_validator("server_hostname")
    @classmethod
    def _hostname(cls, name: str | None) -> str | None:
        return None if name is None else _check_host(name)

    @model_validator(mode="after")
    def _identity(self) -> _ClientTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give both certificate and private_key, or neither")
        return self


class ModbusTls(_ClientTls):
    """Modbus/TCP Security: TLS with mutual authentication, usually on port 802. The PLC's
    certificate is verified against ``ca``; we present ``certificate``."""

    ca: Path = Field(description="CA or trusted certificates (PEM or DER) to verify the PLC.")
    certificate: Path = Field(description="Our client certificate (PEM or DER), for mutual auth.")
    private_key: Path = Field(description="Its private key (PEM).")
    server_hostname: str | None = Field(
        None, description="Name or IP the PLC's certificate must carry (default: host)."
    )
    sim: ModbusSimTls | None = Field(
        None, description="Simulator only: its certificate, key and client CA."
    )


class MqttTls(_ClientTls):
    """TLS to the broker (usually port 8883). A client certificate is optional: most brokers
    log in with user and password (``login``)."""


class ModbusPlc(Connection):
    protocol: Literal["modbus"]
    host: str = Field(description="IP address or host name of the PLC.")
    port: int = Field(502, ge=0, le=65535)
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit id (slave id) of the PLC.")
    poll_interval_s: float = Field(0.1, gt=0, description="Time between block reads.")
    tls: ModbusTls | None = Field(
        None,
        description="Modbus/TCP Security (TLS, mutual auth; port 802 by convention). Without "
        "it the connection is plaintext and unauthenticated; see docs/security.md.",
    )

    _host = field_validator("host")(_check_host)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def _relative_to_config(path: Path, info: ValidationInfo) -> Path:
    """A relative path is relative to the config file's directory (when it was read from one)."""
    source = (info.context or {}).get("source", "")
    if path.is_absolute() or not source or source.startswith("<"):
        return path
    return Path(source).parent / path


def _no_inline_password(data: Any) -> Any:
    """A secret's model refuses a password written into the config itself."""
    if isinstance(data, dict) and "password" in data:
        raise ValueError(
            "a password must not be written in the config; put it in an environment "
            "variable named by password_env, or in a file named by password_file"
        )
    return data


class OpcUaSecurity(_Model):
    """Security of one OPC UA connection: our application instance certificate, the
    certificates we trust, and the user we log in as. The password never is in the file."""

    policy: Literal["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"] = Field(
        "Basic256Sha256", description="Security policy; the deprecated Basic256 is refused."
    )
    mode: Literal["Sign", "SignAndEncrypt"] = Field(
        "SignAndEncrypt", description="'Sign' protects integrity only; the traffic is readable."
    )
    certificate: Path = Field(description="Our application instance certificate (DER or PEM).")
    private_key: Path = Field(description="Its private key (PEM or DER, unencrypted).")
    trust: Path | list[Path] = Field(
        description="Trusted server certificates or CAs: a directory, or a list of files."
    )
    application_uri: str = Field(
        description="Our ApplicationUri; must be the URI in our certificate's subjectAltName."
    )
    user: str | None = Field(None, description="User name to log in with; none = anonymous.")
    password_env: str | None = Field(
        None, description="Environment variable that holds the user's password."
    )
    password_file: Path | None = Field(
        None, description="File whose first line is the user's password."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        return _no_inline_password(data)

    @field_validator("certificate", "private_key", "password_file")
    @classmethod
    def _paths(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _relative_to_config(path, info)

    @field_validator("trust")
    @classmethod
    def _trust(cls, trust: Path | list[Path], info: ValidationInfo) -> Path | list[Path]:
        if isinstance(trust, list):
            if not trust:
                raise ValueError("an empty trust list trusts no server; name at least one")
            return [_relative_to_config(p, info) for p in trust]
        return _relative_to_config(trust, info)

    @field_validator("application_uri")
    @classmethod
    def _uri(cls, uri: str) -> str:
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", uri):
            raise ValueError(f"'{uri}' is not a URI (like urn:example.com:linectl:cell_a)")
        return uri

    @model_validator(mode="after")
    def _login(self) -> OpcUaSecurity:
        has_secret = self.password_env is not None or self.password_file is not None
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("give password_env or password_file, not both")
        if self.user is not None and not has_secret:
            raise ValueError(f"user '{self.user}' needs password_env or password_file")
        if self.user is None and has_secret:
            raise ValueError("password_env/password_file given without a user")
        return self


class OpcUaPlc(Connection):
    protocol: Literal["opcua"]
    url: str = Field(description="Endpoint URL, opc.tcp://host:port[/path].")
    publishing_interval_s: float = Field(
        0.05, ge=0, description="Subscription publishing interval."
    )
    mode: Literal["subscribe", "poll"] = Field(
        "subscribe", description="'poll' only for servers that cannot subscribe."
    )
    poll_interval_s: float = Field(0.1, gt=0, description="Used when mode is 'poll'.")
    security: OpcUaSecurity | None = Field(
        None,
        description="Certificates, trust list and login. Without it the connection is "
        "unsigned, unencrypted and anonymous (security mode None); see docs/security.md.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError(f"'{url}' is not an opc.tcp://host:port URL")
        _check_host(parts.hostname)
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"'{url}' has a malformed port") from exc
        return url

    @property
    def where(self) -> str:
        return self.url


def _plc_kind(value: Any) -> str | None:
    protocol = (
        value.get("protocol") if isinstance(value, dict) else getattr(value, "protocol", None)
    )
    return {"modbus": "<modbus>", "opcua": "<opcua>"}.get(protocol)


Plc = Annotated[
    Annotated[ModbusPlc, Tag("<modbus>")] | Annotated[OpcUaPlc, Tag("<opcua>")],
    Discriminator(
        _plc_kind,
        custom_error_type="unknown_protocol",
        custom_error_message="protocol must be 'modbus' or 'opcua'",
    ),
]


class SimSpec(_Model):
    """How the bundled simulators behave for one station; linectl itself never reads this."""

    distribution: Literal["fixed", "normal", "lognormal", "exponential"] = "fixed"
    spread: float = Field(0.0, ge=0, description="Standard deviation as a fraction of cycle_s.")
    reject_p: float = Field(0.0, ge=0, le=1, description="Probability a unit is rejected.")
    fault_p: float = Field(0.0, ge=0, le=1, description="Probability a cycle faults.")
    fault_code: int = Field(1, ge=1, le=65535, description="Fault code shown while Aborted.")
    seed: int | None = Field(None, description="Seed for repeatable runs.")


class Station(_Model):
    plc: str = Field(description="Name of the PLC that runs this station.")
    address: int | str = Field(
        description="Modbus: first holding register (0-based) of the station's block. "
        "OPC UA: browse name of the station object."
    )
    cycle_s: float = Field(gt=0, description="Nominal (ideal) cycle time, seconds.")
    capacity: int = Field(1, ge=1, le=64, description="Units in process at once.")
    availability: float = Field(1.0, gt=0, le=1, description="Share of time the station is up.")
    on_reject: str | None = Field(
        None,
        description="Rework station (not itself in the flow) that a unit rejected here goes to "
        "instead of quarantine; after rework it carries on with the step after this one.",
    )
    sim: SimSpec = Field(default_factory=SimSpec)


Policy = Literal["round_robin", "least_loaded", "shortest_expected", "weighted"]


class Route(_Model):
    policy: Policy = "round_robin"
    branches: list[list[Step]] = Field(min_length=1)
    weights: list[float] | None = Field(None, description="One weight per branch ('weighted').")


class RouteStep(_Model):
    route: Route


class ForkStep(_Model):
    fork: list[list[Step]] = Field(min_length=1)


def _step_kind(value: Any) -> str:
    if isinstance(value, dict):
        if "route" in value:
            return "<route>"
        if "fork" in value:
            return "<fork>"
        return "<route>"  # reported as a missing 'route' key, the more common intent
    if isinstance(value, RouteStep):
        return "<route>"
    if isinstance(value, ForkStep):
        return "<fork>"
    return "<station>"


Step = Annotated[
    Annotated[str, Tag("<station>")]
    | Annotated[RouteStep, Tag("<route>")]
    | Annotated[ForkStep, Tag("<fork>")],
    Discriminator(_step_kind),
]


class Release(_Model):
    max_wip: int | None = Field(
        None, ge=1, description="CONWIP cap on units in the line (default: every slot of the line)."
    )
    interval_s: float | None = Field(None, gt=0, description="Release at most one unit this often.")
    count: int | None = Field(None, ge=1, description="Units to release in all (default: no end).")


class Retry(_Model):
    attempts: int = Field(3, ge=1, description="Tries of one step before the unit is quarantined.")
    backoff_s: float = Field(1.0, ge=0, description="Wait before resetting a faulted station.")
    backoff_max_s: float = Field(30.0, ge=0)


class Storage(_Model):
    url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<line>.sqlite3")


class Endpoint(_Model):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Names clients may call this endpoint by, besides its address; any other "
        "name in a request's Host header is refused (DNS rebinding). docs/security.md.",
    )

    _host = field_validator("host")(_check_host)

    @field_validator("allowed_hosts")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_host(n) for n in names)


# --- northbound: the line's state for SCADA, MES and historians (docs/northbound.md) --------


def _topic_level(level: str, what: str) -> str:
    if not level or level in {"+", "#"} or {"+", "#", "/", "\0"} & set(level):
        raise ValueError(f"{what} '{level}' must be one MQTT topic level, without + # or /")
    return level


class NorthboundSecret(_Model):
    """A password kept out of the file: in an environment variable or a file's first line."""

    password_env: str | None = Field(None, description="Environment variable with the password.")
    password_file: Path | None = Field(None, description="File whose first line is the password.")

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        return _no_inline_password(data)

    @field_validator("password_file")
    @classmethod
    def _path(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _relative_to_config(path, info)

    @model_validator(mode="after")
    def _one_secret(self) -> NorthboundSecret:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError("give exactly one of password_env or password_file")
        return self


class MqttLogin(NorthboundSecret):
    user: str = Field(description="User name on the broker.")


class UnsTopics(_Model):
    """The unified namespace: JSON under <topic_prefix>/<line>/..., ISA-95 levels."""

    topic_prefix: str = Field(
        description="Enterprise/site/area levels before the line, like 'acme/dresden/assembly'."
    )
    qos: Literal[0, 1, 2] = 1

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if prefix.startswith("$") or prefix.startswith("spBv1.0"):
            raise ValueError(f"topic_prefix '{prefix}' may not start with $ or spBv1.0")
        for level in prefix.split("/"):
            _topic_level(level, "topic_prefix level")
        return prefix


class SparkplugNode(_Model):
    """Sparkplug B 3.0: this line is an edge node, each station a device."""

    group_id: str = Field(description="Sparkplug group id.")
    edge_node_id: str | None = Field(None, description="Edge node id (default: the line's name).")

    @field_validator("group_id", "edge_node_id")
    @classmethod
    def _level(cls, level: str | None, info: ValidationInfo) -> str | None:
        return None if level is None else _topic_level(level, str(info.field_name))


class Spool(_Model):
    """Store and forward: messages kept on disk while the broker is away."""

    dir: Path | None = Field(None, description="Directory (default: <line>.spool/ here).")
    max_messages: int = Field(100_000, ge=1, le=10_000_000)
    max_bytes: int = Field(64 << 20, ge=1024, le=4 << 30)

    @field_validator("dir")
    @classmethod
    def _path(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _relative_to_config(path, info)


class NorthboundMqtt(_Model):
    """One broker for the unified namespace and Sparkplug B (one connection each)."""

    host: str = Field("127.0.0.1", description="Broker host.")
    port: int = Field(1883, ge=1, le=65535)
    timeout_s: float = Field(
        2.0, gt=0, description="Deadline of an acknowledgement (PUBACK, SUBACK, PINGRESP)."
    )
    connect_timeout_s: float = Field(3.0, gt=0, description="Deadline of one connect attempt.")
    backoff_initial_s: float = Field(0.2, gt=0, description="First reconnect delay.")
    backoff_max_s: float = Field(10.0, gt=0, description="Longest reconnect delay.")
    client_id: str | None = Field(None, description="Base client id (default: linectl-<line>).")
    login: MqttLogin | None = None
    tls: MqttTls | None = None
    keepalive_s: int = Field(10, ge=2, le=3600)
    queue: int = Field(10_000, ge=1, le=1_000_000, description="Messages held in memory.")
    uns: UnsTopics | None = None
    sparkplug: SparkplugNode | None = None
    spool: Spool = Field(default_factory=Spool)

    _host = field_validator("host")(_check_host)

    @model_validator(mode="after")
    def _something(self) -> NorthboundMqtt:
        if self.uns is None and self.sparkplug is None:
            raise ValueError("give uns, sparkplug or both; without them nothing is published")
        return self


class OpcUaServerUser(NorthboundSecret):
    role: Literal["viewer", "operator"] = Field(
        "viewer", description="'operator' may call Pause, Drain and ReleaseQuarantined."
    )


class OpcUaServerSecurity(_Model):
    certificate: Path = Field(description="The server's application instance certificate.")
    private_key: Path = Field(description="Its private key (PEM or DER, unencrypted).")
    trust: Path | list[Path] = Field(description="Client certificates or CAs it accepts.")
    application_uri: str = Field(description="The URI in the certificate's subjectAltName.")
    policies: list[Literal["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]] = (
        Field(default_factory=lambda: ["Basic256Sha256", "Aes128_Sha256_RsaOaep"], min_length=1)
    )
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"

    @field_validator("certificate", "private_key")
    @classmethod
    def _paths(cls, path: Path, info: ValidationInfo) -> Path:
        return _relative_to_config(path, info)

    @field_validator("trust")
    @classmethod
    def _trust(cls, trust: Path | list[Path], info: ValidationInfo) -> Path | list[Path]:
        return OpcUaSecurity._trust(trust, info)

    @field_validator("application_uri")
    @classmethod
    def _uri(cls, uri: str) -> str:
        return OpcUaSecurity._uri(uri)


class NorthboundOpcUa(_Model):
    """An OPC UA server exposing the line, read-only but for operators' methods."""

    host: str = "127.0.0.1"
    port: int = Field(4841, ge=0, le=65535)
    path: str = Field("/linectl", pattern=r"^(/[A-Za-z0-9_.-]+)*$")
    security: OpcUaServerSecurity | None = None
    users: dict[str, OpcUaServerUser] = Field(default_factory=dict)
    allow_anonymous: bool = Field(
        False,
        description="Also offer a None endpoint with anonymous read-only login (loopback only).",
    )
    max_sessions: int = Field(16, ge=1, le=1000)
    kpi_interval_s: float = Field(
        1.0, ge=0.1, le=3600, description="How often Throughput, OEE, Bottleneck are refreshed."
    )

    _host = field_validator("host")(_check_host)

    @model_validator(mode="after")
    def _secure(self) -> NorthboundOpcUa:
        if self.security is None and not self.allow_anonymous:
            raise ValueError(
                "needs security (certificate, private_key, trust, application_uri), or "
                "allow_anonymous: true for a read-only loopback endpoint"
            )
        if self.allow_anonymous and not _is_loopback(self.host):
            raise ValueError(f"allow_anonymous is only allowed on a loopback host, not {self.host}")
        if self.users and self.security is None:
            raise ValueError("users need security: a password never travels over a None channel")
        if self.security is not None and not self.users and not self.allow_anonymous:
            raise ValueError("no users and no allow_anonymous: nobody could log in")
        return self


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Northbound(_Model):
    mqtt: NorthboundMqtt | None = None
    opcua: NorthboundOpcUa | None = None


class Line(_Model):
    line: str = Field(pattern=_NAME, description="Name of the line (metric label, database key).")
    plcs: dict[str, Plc] = Field(min_length=1)
    stations: dict[str, Station] = Field(min_length=1)
    flow: list[Step] = Field(min_length=1)
    release: Release = Field(default_factory=Release)
    retry: Retry = Field(default_factory=Retry)
    storage: Storage = Field(default_factory=Storage)
    metrics: Endpoint = Field(default_factory=lambda: Endpoint(port=9464))
    api: Endpoint = Field(default_factory=lambda: Endpoint(port=9465))
    time_scale: float = Field(1.0, gt=0, description="Wall seconds per config second.")
    northbound: Northbound | None = Field(None, description="OPC UA server and MQTT for the plant.")
    drain: list[str] = Field(
        default_factory=list,
        description="Stations kept out of service: they finish what they hold, take nothing "
        "new (changeable with SIGHUP; docs/service.md).",
    )

    @property
    def storage_url(self) -> str:
        return self.storage.url or f"sqlite:///{self.line}.sqlite3"

    def plc_of(self, station: str) -> ModbusPlc | OpcUaPlc:
        return self.plcs[self.stations[station].plc]


Route.model_rebuild()
ForkStep.model_rebuild()
RouteStep.model_rebuild()
Line.model_rebuild()


def walk(flow: list[Any], path: str = "flow") -> Iterator[tuple[str, Any]]:
    """Every step of a flow, depth first, with its path: ``flow[0].route.branches[1][2]``."""
    for i, step in enumerate(flow):
        here = f"{path}[{i}]"
        yield here, step
        if isinstance(step, RouteStep):
            for b, branch in enumerate(step.route.branches):
                yield from walk(branch, f"{here}.route.branches[{b}]")
        elif isinstance(step, ForkStep):
            for b, branch in enumerate(step.fork):
                yield from walk(branch, f"{here}.fork[{b}]")


def flow_stations(flow: list[Any]) -> list[str]:
    return [step for _, step in walk(flow) if isinstance(step, str)]


# --- Loading and error reporting ------------------------------------------------------------


@dataclass
class _Source:
    name: str
    lines: dict[str, int]  # path -> 1-based line number

    def at(self, path: str) -> str:
        # Fall back to the nearest enclosing path that has a known line.
        probe = path
        while probe:
            if probe in self.lines:
                return f"{self.name}:{self.lines[probe]}"
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return self.name


def _positions(
    node: yaml.Node, path: str, out: dict[str, int], duplicates: list[tuple[str, str]]
) -> None:
    """Line numbers of every path; and every key given twice in one mapping, which YAML
    would otherwise resolve silently by keeping the last (a second 'testing:' station)."""
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[object, int] = {}
        for key, value in node.value:
            sub = f"{path}.{key.value}" if path else str(key.value)
            line = key.start_mark.line + 1
            if key.value in seen:
                duplicates.append(
                    (
                        sub,
                        f"key '{key.value}' is given twice (lines {seen[key.value]} and "
                        f"{line}); YAML would keep only the last",
                    )
                )
            seen[key.value] = line
            out[sub] = line
            _positions(value, sub, out, duplicates)
            out[sub] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, f"{path}[{i}]", out, duplicates)


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, str) and part.startswith("<") and part.endswith(">"):
            continue  # the tag of a union member, not a key of the file
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.startswith("function-"):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_rework(cfg: Line, in_flow: dict[str, str]) -> list[tuple[str, str]]:
    """A rework station exists, is off the flow, serves one station and has no rework of its
    own (so a unit can never loop)."""
    problems: list[tuple[str, str]] = []
    names = sorted(cfg.stations)
    serves: dict[str, str] = {}
    for name, st in cfg.stations.items():
        target = st.on_reject
        if target is None:
            continue
        where = f"stations.{name}.on_reject"
        if target not in cfg.stations:
            problems.append((where, f"unknown station '{target}'{_did_you_mean(target, names)}"))
        elif name not in in_flow:
            problems.append((where, f"'{name}' is not in the flow, so it never rejects a unit"))
        elif target in in_flow:
            problems.append(
                (where, f"'{target}' is in the flow at {in_flow[target]}; a rework station is not")
            )
        elif target in serves:
            problems.append(
                (where, f"'{target}' is already the rework station of '{serves[target]}'")
            )
        elif cfg.stations[target].on_reject is not None:
            problems.append((where, f"rework station '{target}' may not have an on_reject"))
        else:
            serves[target] = name
    return problems


def _check_references(cfg: Line) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    names = sorted(cfg.stations)
    for name, st in cfg.stations.items():
        if st.plc not in cfg.plcs:
            problems.append(
                (
                    f"stations.{name}.plc",
                    f"unknown PLC '{st.plc}'{_did_you_mean(st.plc, sorted(cfg.plcs))}; "
                    f"define it under plcs",
                )
            )
    for i, name in enumerate(cfg.drain):
        if name not in cfg.stations:
            problems.append(
                (f"drain[{i}]", f"unknown station '{name}'{_did_you_mean(name, names)}")
            )
    used: dict[str, str] = {}
    for path, step in walk(cfg.flow):
        if isinstance(step, str):
            if step not in cfg.stations:
                problems.append((path, f"unknown station '{step}'{_did_you_mean(step, names)}"))
            elif step in used:
                problems.append(
                    (
                        path,
                        f"station '{step}' is already used at {used[step]}; "
                        "a station may appear once in a flow",
                    )
                )
            else:
                used[step] = path
        elif isinstance(step, RouteStep):
            route = step.route
            for b, branch in enumerate(route.branches):
                if not branch:
                    problems.append(
                        (
                            f"{path}.route.branches[{b}]",
                            "empty branch; remove it or give it at least one step",
                        )
                    )
            if route.policy == "weighted":
                if route.weights is None or len(route.weights) != len(route.branches):
                    problems.append(
                        (
                            f"{path}.route.weights",
                            f"policy 'weighted' needs one weight per branch "
                            f"({len(route.branches)})",
                        )
                    )
                elif any(w < 0 for w in route.weights) or sum(route.weights) <= 0:
                    problems.append(
                        (f"{path}.route.weights", "weights must be >= 0 with a positive sum")
                    )
            elif route.weights is not None:
                problems.append(
                    (
                        f"{path}.route.weights",
                        f"weights are only read by policy 'weighted', not '{route.policy}'",
                    )
                )
        elif isinstance(step, ForkStep):
            for b, branch in enumerate(step.fork):
                if not branch:
                    problems.append(
                        (
                            f"{path}.fork[{b}]",
                            "empty branch; remove it or give it at least one step",
                        )
                    )
    problems.extend(_check_rework(cfg, used))
    problems.extend(_check_addresses(cfg))
    problems.extend(_check_endpoints(cfg))
    return problems


def _check_endpoints(cfg: Line) -> list[tuple[str, str]]:
    """metrics and api cannot share a port on one address: the second would not start."""
    m, a = cfg.metrics, cfg.api
    if m.port == 0 or m.port != a.port:
        return []

    def address(host: str) -> str:
        return "127.0.0.1" if host == "localhost" else host

    wildcard = {"0.0.0.0", "::"}
    if address(m.host) == address(a.host) or {m.host, a.host} & wildcard:
        return [
            (
                "api.port",
                f"port {a.port} is also metrics.port on {m.host}; give the operator API "
                "and the metrics endpoint different ports",
            )
        ]
    return []


def _check_addresses(cfg: Line) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    taken: dict[tuple[str, Any], str] = {}
    blocks: dict[str, list[tuple[int, int, str]]] = {}
    for name, st in cfg.stations.items():
        plc = cfg.plcs.get(st.plc)
        if plc is None:
            continue
        path = f"stations.{name}.address"
        key = (st.plc, st.address)
        if key in taken:
            problems.append(
                (
                    path,
                    f"PLC '{st.plc}' address {st.address!r} is already used by "
                    f"station '{taken[key]}'",
                )
            )
            continue
        taken[key] = name
        if isinstance(plc, ModbusPlc):
            if not isinstance(st.address, int) or st.address < 0:
                problems.append(
                    (
                        path,
                        f"a Modbus station's address is its first holding "
                        f"register, an integer >= 0, not {st.address!r}",
                    )
                )
                continue
            size = block_words(st.capacity)
            if size > MODBUS_MAX_READ:
                problems.append(
                    (
                        f"stations.{name}.capacity",
                        f"capacity {st.capacity} needs "
                        f"{size} registers, more than one Modbus read "
                        f"({MODBUS_MAX_READ}); use at most 7 slots",
                    )
                )
            if st.address + size > 65536:
                problems.append(
                    (path, f"block {st.address}..{st.address + size - 1} runs past register 65535")
                )
            blocks.setdefault(st.plc, []).append((st.address, st.address + size, name))
        elif not isinstance(st.address, str) or not re.match(_NAME, st.address):
            problems.append(
                (
                    path,
                    f"an OPC UA station's address is the browse name of its "
                    f"object (letters, digits, _ . -), not {st.address!r}",
                )
            )
    for plc, spans in blocks.items():
        spans.sort()
        for (a0, a1, an), (b0, _b1, bn) in itertools.pairwise(spans):
            if b0 < a1:
                problems.append(
                    (
                        f"stations.{bn}.address",
                        f"block {b0}.. overlaps station '{an}' ({a0}..{a1 - 1}) on "
                        f"PLC '{plc}'; each station needs its own registers",
                    )
                )
    return problems


# Bounds on the YAML itself, checked before anything is built from it: a line config is a few
# KiB, so these only stop hostile or broken input (an alias "bomb" expands 817 bytes into
# billions of nodes; 3,000 nested lists exhaust Python's recursion).
MAX_CONFIG_BYTES = 1024 * 1024
MAX_DEPTH = 64  # nesting of lists and mappings, aliases expanded
MAX_NODES = 100_000  # scalars, lists and mappings, aliases expanded


def _at(source: str, mark: yaml.Mark | None) -> str:
    return f"{source}:{mark.line + 1}" if mark is not None else source


def _check_events(text: str, source: str) -> None:
    """Nesting depth, from the parser's events (the parser keeps a stack of its own; the
    composer that runs after it recurses once per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(
                    [f"{_at(source, event.start_mark)}: nested more than {MAX_DEPTH} levels deep"]
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


MAX_NUMBER = 1e12  # 31,700 years in seconds; beyond it analyze's arithmetic overflows


def _floats(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every float of a validated config with its path (ints are exact, and a seed may be
    large). Walks the models, so "1e308" (a string in YAML 1.1, a float to pydantic) counts."""
    if isinstance(value, float):
        yield path, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _floats(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floats(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _floats(item, f"{path}[{i}]")


def _check_graph(root: yaml.Node, source: str) -> None:
    """The document with its aliases expanded: no alias inside what it names, and at most
    MAX_NODES nodes MAX_DEPTH deep. Each node is visited once, so a bomb costs its size in
    bytes, not its expansion."""
    seen: dict[int, tuple[int, int]] = {}  # node -> (nodes, levels) of its expansion
    open_: set[int] = set()

    def fail(node: yaml.Node, message: str) -> NoReturn:
        raise ConfigError([f"{_at(source, node.start_mark)}: {message}"])

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_:
            fail(node, "an alias refers to a node that contains it")
        if key not in seen:
            open_.add(key)
            if isinstance(node, yaml.SequenceNode):
                children = [visit(item, depth + 1) for item in node.value]
            elif isinstance(node, yaml.MappingNode):
                children = [visit(n, depth + 1) for pair in node.value for n in pair]
            else:
                children = []
            open_.discard(key)
            seen[key] = (
                1 + sum(n for n, _ in children),
                1 + max((levels for _, levels in children), default=0),
            )
        nodes, levels = seen[key]
        if depth + levels > MAX_DEPTH:
            fail(node, f"nested more than {MAX_DEPTH} levels deep (aliases expanded)")
        if nodes > MAX_NODES:
            fail(
                node,
                f"expands to more than {MAX_NODES} values (aliases expanded); "
                "a line config is far smaller",
            )
        return nodes, levels

    visit(root, 0)


def parse_config(text: str, source: str = "<config>") -> Line:
    """Validate a line config from YAML text. Raises ConfigError listing every problem."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"{source}: {len(text)} characters; a config may have at most {MAX_CONFIG_BYTES}"]
        )
    loader = yaml.SafeLoader(text)
    try:
        _check_events(text, source)
        node = loader.get_single_node()
        if node is not None:
            _check_graph(node, source)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([f"{where}: YAML syntax error: {exc.problem or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {exc}"]) from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping with keys line, plcs, stations, flow"])
    lines: dict[str, int] = {}
    duplicates: list[tuple[str, str]] = []
    _positions(node, "", lines, duplicates)
    where = _Source(source, lines)
    if duplicates:
        raise ConfigError([f"{where.at(path)}: {path}: {msg}" for path, msg in duplicates])
    try:
        cfg = Line.model_validate(data, context={"source": source})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = _loc_to_path(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key; remove it or check its spelling"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{where.at(path)}: {path or '(top)'}: {msg}")
        raise ConfigError(problems) from None
    bad = [
        f"{where.at(path)}: {path}: {value} is not a number a line can use; numbers in a "
        f"config are finite and at most {MAX_NUMBER:g} in size"
        for path, value in _floats(cfg)
        if not math.isfinite(value) or abs(value) > MAX_NUMBER
    ]
    if bad:
        raise ConfigError(bad)
    problems = [f"{where.at(path)}: {path}: {msg}" for path, msg in _check_references(cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path) -> Line:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a line config is a few KiB"]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [
                f"{path}:{line}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset "
                f"{exc.start}; save the file as UTF-8"
            ]
        ) from None
    return parse_config(text, str(path))


def json_schema() -> dict[str, Any]:
    return Line.model_json_schema()
