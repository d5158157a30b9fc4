"""The one TOML config file shared by producer and worker, loaded into frozen dataclasses.

Each program asks only for the sections it uses (``sections=``): a cluster node running
the producer has no SMTP password file, and must not fail over one. Every problem found is
collected with its path before :class:`ConfigError` is raised. Secrets are read from files
into :class:`Secret`, so no repr of a config shows them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, unquote, urlsplit

from shared.errors import ClusteralertError, ConfigError, Problem
from shared.levels import LEVELS, Level
from shared.notification import MAX_BUNDLE
from shared.secret import Secret, read_secret_file
from shared.tables import Table

__all__ = [
    "CHARSETS",
    "DEFAULT_CONFIG_PATH",
    "SECTIONS",
    "BrokerConfig",
    "BrokerUrl",
    "CanaryConfig",
    "CatalogConfig",
    "Config",
    "FilterConfig",
    "FollowConfig",
    "IncidentConfig",
    "MailConfig",
    "MetricsConfig",
    "ProducerConfig",
    "Route",
    "SmtpRelay",
    "WorkerConfig",
    "config_secrets",
    "is_key_pattern",
    "load_config",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/clusteralert/clusteralert.toml")
CONFIG_ENV: Final = "CLUSTERALERT_CONFIG"
SECTIONS: Final = (
    "broker",
    "producer",
    "mail",
    "smtp",
    "filter",
    "catalog",
    "metrics",
    "worker",
    "route",
    "incident",
    "canary",
)
CHARSETS: Final = (
    "utf-8",
    "iso-2022-jp",
    "shift_jis",
    "euc-jp",
    "iso-8859-1",
    "us-ascii",
    "gb2312",
)
Security = Literal["starttls", "smtps", "none"]
SECURITIES: Final[tuple[Security, ...]] = ("starttls", "smtps", "none")
UnknownPolicy = Literal["info", "warning", "error", "never"]
DEFAULT_SPOOL_DIR: Final = Path("/var/lib/clusteralert/spool")
DEFAULT_SENDER: Final = "clusteralert@localhost"
DEFAULT_SUBJECT: Final = "[{level}] {cluster} {node}: {message}"

# Deliberately strict: addresses come from the operator's config, and anything exotic
# (display names, CR/LF, several addresses in one string) is more likely a mistake.
# Printable ASCII only: the mail head is ASCII, and SMTPUTF8 is not supported.
_ADDRESS_RE: Final = re.compile(r"[!#-'*+\-/-9=?A-Z^-~]+@[A-Za-z0-9.-]+")
_KEY_PATTERN_RE: Final = re.compile(r"[a-z0-9_*?-]+:[0-9*?]+")


def is_plain_address(address: str) -> bool:
    """One plain e-mail address, as the config takes them (see _ADDRESS_RE)."""
    return _ADDRESS_RE.fullmatch(address) is not None


def is_key_pattern(pattern: str) -> bool:
    """A ``module:event_id`` pattern as ``[filter]`` and silences take them."""
    return _KEY_PATTERN_RE.fullmatch(pattern) is not None


_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?")
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    scheme: Literal["amqp", "amqps"]
    host: str
    port: int
    vhost: str
    username: str
    password: Secret | None = field(default=None, compare=False)

    def __str__(self) -> str:
        """The URL without the password, for logs."""
        return f"{self.scheme}://{self.username}@{self.host}:{self.port}/{quote(self.vhost, '')}"

    def with_secret(self) -> str:
        """The full URL, password included, for the client library only."""
        userinfo = quote(self.username, "")
        if self.password is not None:
            userinfo += ":" + quote(self.password.reveal(), "")
        return f"{self.scheme}://{userinfo}@{self.host}:{self.port}/{quote(self.vhost, '')}"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    urls: tuple[BrokerUrl, ...] = (
        BrokerUrl("amqp", "localhost", 5672, "/", "guest", Secret("guest")),
    )
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    heartbeat: int = 30
    connect_timeout: float = 10.0


# Program tags (the syslog field before the colon) whose lines the default pattern takes.
DEFAULT_TAGS: Final = ("clusterpro", "expresscls")
_TAG_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def clusterpro_pattern(tags: Sequence[str]) -> str:
    """The CLUSTERPRO-style syslog line "<type: rm><event: 9> message" as a syslog daemon
    writes it to a file (traditional or ISO timestamp, host, then the program tag), from
    a program whose tag begins with one of ``tags``. Anchored at the line's start: the
    same text inside another program's message (a user name sshd logs, ``logger``) is
    not an alert. Not confirmed from public documentation; configurable per follower.
    Linear: no two adjacent repeats can take the same characters."""
    tag = "|".join(re.escape(t) for t in tags)
    return (
        r"^(?:[A-Z][a-z]{2} +[0-9]{1,2} +[0-9:]{8}|[0-9]{4}-[0-9]{2}-[0-9]{2}T[^ ]+) +"
        r"(?P<node>[^ ]{1,255}) +"
        rf"(?:{tag})[^ :\[]*(?:\[[0-9]{{1,10}}\])?: +"
        r"<type: ?(?P<module>[a-z0-9_-]{1,32})><event: ?(?P<event_id>[0-9]{1,18})> ?"
        r"(?P<message>.*)"
    )


CLUSTERPRO_PATTERN: Final = clusterpro_pattern(DEFAULT_TAGS)


@dataclass(frozen=True, slots=True)
class FollowConfig:
    """One log file followed by ``clusteralert-producer run``."""

    path: Path
    patterns: tuple[str, ...] = (CLUSTERPRO_PATTERN,)
    # Used when a pattern has no such group.
    module: str | None = None
    event_id: int | None = None
    level: str | None = None


@dataclass(frozen=True, slots=True)
class ProducerConfig:
    spool_dir: Path = DEFAULT_SPOOL_DIR
    cluster: str = "cluster"
    node: str = ""  # empty: the host name at the time of the event
    # Bounds of the spool; emit fails loudly beyond them (0: unbounded).
    max_events: int = 10_000
    max_bytes: int = 100 * 1024 * 1024
    metrics_port: int = 0  # 0: no metrics endpoint on the node
    # Seconds a publish may wait for its confirm before the agent tries the next broker.
    confirm_timeout: float = 30.0
    follow: tuple[FollowConfig, ...] = ()
    # Seconds between the agent's heartbeats (0: none); the node-silent alert waits for
    # a few missed ones.
    heartbeat_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class MailConfig:
    sender: str = DEFAULT_SENDER
    to: tuple[str, ...] = ()
    subject: str = DEFAULT_SUBJECT
    charset: str = "utf-8"
    # False writes the subject raw in the charset, for legacy receivers that cannot
    # decode RFC 2047 (as CLUSTERPRO offers); the default encodes it.
    subject_encode: bool = True
    # Add an HTML alternative part (every event field escaped) to the plain text.
    html: bool = False
    # A display name for From ("Cluster alerts"), encoded in the mail's charset if needed.
    from_name: str = ""

    @property
    def domain(self) -> str:
        return self.sender.rpartition("@")[2]


@dataclass(frozen=True, slots=True)
class Route:
    """Recipients for events that match: the first matching route wins, and events no
    route matches go to ``[mail] to``."""

    to: tuple[str, ...]
    match: tuple[str, ...] = ()  # module:event_id patterns; empty matches every key
    min_level: Level = "info"


@dataclass(frozen=True, slots=True)
class SmtpRelay:
    host: str
    port: int
    security: Security = "starttls"
    username: str | None = None
    password: Secret | None = field(default=None, compare=False)
    ca_file: Path | None = None
    timeout: float = 30.0
    max_connections: int = 4
    # After 3 failures in a row the relay is skipped this long, unless no relay is left.
    cooldown: float = 30.0
    # At most this many mails per second to this relay from one worker (0: no limit);
    # providers throttle or block senders that flood them.
    rate_limit: float = 0.0
    # The envelope sender and From address through this relay (None: [mail] from), since
    # providers accept only their approved senders; and the name we give in EHLO.
    sender: str | None = None
    helo: str | None = None

    @property
    def label(self) -> str:
        """Metric label and log name of this relay."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class FilterConfig:
    min_level: Level = "info"
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    unknown: UnknownPolicy = "error"


@dataclass(frozen=True, slots=True)
class CatalogConfig:
    paths: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    port: int = 9464


EventLoop = Literal["uvloop", "asyncio"]
EVENT_LOOPS: Final[tuple[EventLoop, ...]] = ("uvloop", "asyncio")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    prefetch: int = 32
    shutdown_grace: float = 30.0
    # How long transient failures are retried through the retry ladder before the alert
    # is dead-lettered, counted from its first failure.
    retry_window: float = 3600.0
    # How long a message may stay with the worker before it goes to the retry ladder
    # instead: well under RabbitMQ's consumer ack timeout (30 minutes by default), past
    # which the broker closes the channel and takes back everything in flight.
    max_hold: float = 600.0
    # The asyncio loop that renders and sends mail: uvloop's costs less CPU per mail.
    event_loop: EventLoop = "uvloop"


StormBy = Literal["cluster", "node", "module", "key"]
STORM_BY: Final[tuple[StormBy, ...]] = ("cluster", "node", "module", "key")


@dataclass(frozen=True, slots=True)
class IncidentConfig:
    """The incident stage: how reports become incidents (durations in seconds)."""

    group_wait: float = 2.0  # hold a new incident this long for other nodes' reports
    repeat_interval: float = 3600.0  # identical reports this soon after the mail: folded
    storm_threshold: int = 10  # notifications per storm group and window; 0: no storms
    storm_window: float = 60.0
    storm_by: tuple[StormBy, ...] = ("cluster",)
    max_held: int = 50_000  # events held unacked at most; past it, oldest flushed early
    # Notifications per message on the mail queue at most (1: one message each). See
    # shared.notification.Bundle: several per message cost far less CPU in a storm, but
    # a worker then holds up to its prefetch times this many mails.
    bundle: int = 8


# The canary's interval once [canary] to names a recipient and interval is not given:
# a mail every 5 minutes, so that a broken path is noticed within the alert's 3 intervals.
CANARY_INTERVAL: Final = 300.0


@dataclass(frozen=True, slots=True)
class CanaryConfig:
    """The canary mailed through the whole path (off unless ``to`` is set)."""

    interval: float = 0.0  # seconds; 0: no canary
    to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None = None
    broker: BrokerConfig = BrokerConfig()
    producer: ProducerConfig = ProducerConfig()
    mail: MailConfig = MailConfig()
    smtp: tuple[SmtpRelay, ...] = ()
    routes: tuple[Route, ...] = ()
    filter: FilterConfig = FilterConfig()
    catalog: CatalogConfig = CatalogConfig()
    metrics: MetricsConfig = MetricsConfig()
    worker: WorkerConfig = WorkerConfig()
    incident: IncidentConfig = IncidentConfig()
    canary: CanaryConfig = CanaryConfig()
    warnings: tuple[Problem, ...] = ()


def config_secrets(config: Config) -> list[Secret]:
    """Every secret the config holds, for scrubbing text that leaves the process."""
    secrets = [url.password for url in config.broker.urls]
    secrets += [relay.password for relay in config.smtp]
    return [s for s in secrets if s is not None]


def resolve_config_path(cli_value: str | None) -> tuple[Path | None, bool]:
    """Where the config comes from: ``--config``, then ``$CLUSTERALERT_CONFIG``, then the
    default path. Returns the path and whether the user named it explicitly (a missing
    explicit file is an error, a missing default file means built-in defaults)."""
    if cli_value:
        return Path(cli_value), True
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(cli_value: str | None = None, *, sections: Collection[str] = SECTIONS) -> Config:
    """Load and validate the config for the named sections. Raises :class:`ConfigError`
    carrying every problem; warnings are returned in ``Config.warnings``."""
    path, explicit = resolve_config_path(cli_value)
    assert path is not None
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if explicit:
            raise ConfigError([Problem(str(path), "config file not found")]) from None
        data = {}
        path = None
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc.strerror}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not valid TOML: {exc}")]) from None
    base = path.parent if path else Path.cwd()
    return parse_config(data, sections=sections, path=path, base=base)


def parse_config(
    data: dict[str, object],
    *,
    sections: Collection[str] = SECTIONS,
    path: Path | None = None,
    base: Path | None = None,
) -> Config:
    """Validate already-parsed TOML. Relative file paths are taken from ``base`` (the
    config file's directory), so a config works wherever it is started from."""
    problems: list[Problem] = []
    root = Table(data, "", problems)
    reader = _Reader(base or Path.cwd())
    parts: dict[str, object] = {}
    if "broker" in sections:
        parts["broker"] = reader.broker(root.table("broker"))
    if "producer" in sections:
        parts["producer"] = reader.producer(root.table("producer"))
    if "mail" in sections:
        parts["mail"] = reader.mail(root.table("mail"))
    if "smtp" in sections:
        parts["smtp"] = tuple(reader.smtp(t) for t in root.tables("smtp"))
        if not parts["smtp"]:
            problems.append(Problem("smtp", "at least one [[smtp]] relay is required"))
    if "route" in sections:
        parts["routes"] = tuple(reader.route(t) for t in root.tables("route"))
    if "filter" in sections:
        parts["filter"] = reader.filter(root.table("filter"))
    if "catalog" in sections:
        parts["catalog"] = reader.catalog(root.table("catalog"))
    if "metrics" in sections:
        metrics = root.table("metrics")
        parts["metrics"] = MetricsConfig(
            port=metrics.integer("port", _default(MetricsConfig, "port"), low=0, high=65535)
        )
        metrics.finish()
    if "worker" in sections:
        worker = root.table("worker")
        parts["worker"] = WorkerConfig(
            prefetch=worker.integer(
                "prefetch", _default(WorkerConfig, "prefetch"), low=1, high=10000
            ),
            shutdown_grace=worker.number(
                "shutdown_grace", _default(WorkerConfig, "shutdown_grace"), low=0, high=3600
            ),
            retry_window=worker.number(
                "retry_window", _default(WorkerConfig, "retry_window"), low=0, high=7 * 86400
            ),
            max_hold=worker.number(
                "max_hold", _default(WorkerConfig, "max_hold"), low=1, high=86400
            ),
            event_loop=worker.choice(
                "event_loop", EVENT_LOOPS, _default(WorkerConfig, "event_loop")
            ),
        )
        worker.finish()
    if "incident" in sections:
        parts["incident"] = reader.incident(root.table("incident"))
    if "canary" in sections:
        parts["canary"] = _canary(root.table("canary"))
    root.skip(*SECTIONS)
    root.finish()
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(errors + [p for p in problems if p.severity == "warning"])
    warnings = tuple(p for p in problems if p.severity == "warning")
    return Config(path=path, warnings=warnings, **parts)  # type: ignore[arg-type]


class _Reader:
    def __init__(self, base: Path):
        self.base = base

    def _path(self, table: Table, key: str) -> Path | None:
        value = table.text(key, "")
        if not value:
            return None
        path = Path(value)
        return path if path.is_absolute() else self.base / path

    def _secret(self, table: Table, key: str) -> Secret | None:
        path = self._path(table, key)
        if path is None:
            return None
        try:
            return read_secret_file(path)
        except ClusteralertError as exc:
            table.error(key, str(exc))
            return None

    def broker(self, t: Table) -> BrokerConfig:
        password = self._secret(t, "password_file")
        raw_urls = t.str_list("urls", None)
        urls: list[BrokerUrl] = []
        if raw_urls is None:
            urls = list(BrokerConfig().urls)
        elif not raw_urls:
            t.error("urls", "at least one broker URL is required")
        for i, raw in enumerate(raw_urls or ()):
            url = _parse_broker_url(raw, f"{t.where('urls')}[{i}]", t.problems)
            if url is not None:
                if password is not None:
                    url = BrokerUrl(
                        url.scheme, url.host, url.port, url.vhost, url.username, password
                    )
                urls.append(url)
        config = BrokerConfig(
            urls=tuple(urls),
            ca_file=self._path(t, "ca_file"),
            cert_file=self._path(t, "cert_file"),
            key_file=self._path(t, "key_file"),
            heartbeat=t.integer("heartbeat", _default(BrokerConfig, "heartbeat"), low=0, high=3600),
            connect_timeout=t.number(
                "connect_timeout", _default(BrokerConfig, "connect_timeout"), low=0.1, high=300
            ),
        )
        if (config.cert_file is None) != (config.key_file is None):
            t.error("cert_file", "cert_file and key_file must be given together")
        t.finish()
        return config

    def producer(self, t: Table) -> ProducerConfig:
        spool = self._path(t, "spool_dir") or DEFAULT_SPOOL_DIR
        config = ProducerConfig(
            spool_dir=spool,
            cluster=t.text("cluster", _default(ProducerConfig, "cluster")),
            node=t.text("node", _default(ProducerConfig, "node")),
            max_events=t.integer("max_events", _default(ProducerConfig, "max_events"), low=0),
            max_bytes=t.integer("max_bytes", _default(ProducerConfig, "max_bytes"), low=0),
            metrics_port=t.integer(
                "metrics_port", _default(ProducerConfig, "metrics_port"), low=0, high=65535
            ),
            confirm_timeout=t.number(
                "confirm_timeout", _default(ProducerConfig, "confirm_timeout"), low=0.1, high=3600
            ),
            follow=tuple(
                f for f in (self.follow(ft) for ft in t.tables("follow")) if f is not None
            ),
            heartbeat_interval=_interval(
                t,
                "heartbeat_interval",
                _default(ProducerConfig, "heartbeat_interval"),
                "heartbeats",
            ),
        )
        t.finish()
        return config

    def follow(self, t: Table) -> FollowConfig | None:
        path = self._path(t, "path")
        if path is None:
            t.error("path", "missing")
        patterns = t.str_list("patterns", (CLUSTERPRO_PATTERN,), allow_single=True)
        if t.has("tags"):
            tags = t.str_list("tags", DEFAULT_TAGS, allow_single=True)
            bad = [i for i, tag in enumerate(tags) if not _TAG_RE.fullmatch(tag)]
            for i in bad:
                t.error(
                    f"tags[{i}]", f"not a program tag (letters, digits, _ . -): {tags[i]!r:.80}"
                )
            if t.has("patterns"):
                t.error("tags", "only used by the default pattern; put the tag in your patterns")
            elif not tags:
                t.error("tags", "empty: no line could match")
            elif not bad:
                patterns = (clusterpro_pattern(tags),)
        module = t.text("module", None)
        event_id = t.integer("event_id", None, low=0)
        level = t.choice("level", LEVELS, None)
        for i, pattern in enumerate(patterns):
            try:
                groups = re.compile(pattern).groupindex
            except re.error as exc:
                t.error(f"patterns[{i}]", f"not a valid regular expression: {exc}")
                continue
            for needed, fallback in (("module", module), ("event_id", event_id)):
                if needed not in groups and fallback is None:
                    t.error(
                        f"patterns[{i}]",
                        f"has no (?P<{needed}>...) group and no {needed} is set for this follower",
                    )
        t.finish()
        if path is None:
            return None
        return FollowConfig(path, patterns, module, event_id, level)

    def mail(self, t: Table) -> MailConfig:
        sender = _sender(t, "from", DEFAULT_SENDER)
        assert sender is not None
        from_name = t.text("from_name", _default(MailConfig, "from_name"))
        if _CONTROL_RE.search(from_name) or len(from_name) > 200:
            t.error("from_name", "must be one line of at most 200 characters")
        to = _recipients(t)
        subject = t.text("subject", DEFAULT_SUBJECT)
        if "\n" in subject or "\r" in subject:
            t.error("subject", "must be one line")
        config = MailConfig(
            sender=sender,
            to=to,
            subject=subject,
            charset=t.choice("charset", CHARSETS, _default(MailConfig, "charset")),
            subject_encode=t.flag("subject_encode", _default(MailConfig, "subject_encode")),
            html=t.flag("html", _default(MailConfig, "html")),
            from_name=from_name,
        )
        t.finish()
        return config

    def smtp(self, t: Table) -> SmtpRelay:
        security = t.choice("security", SECURITIES, _default(SmtpRelay, "security"))
        default_port = 465 if security == "smtps" else 587 if security == "starttls" else 25
        username = t.text("username", None)
        password = self._secret(t, "password_file")
        if t.has("password"):
            t.skip("password")
            t.error("password", "put the password in a file and name it in password_file")
        elif username and not t.has("password_file"):
            t.error("password_file", "username is set, so password_file is required")
        if security == "none":
            t.warn("security", "plaintext SMTP chosen: mail and any password travel unencrypted")
        relay = SmtpRelay(
            host=t.text("host"),
            port=t.integer("port", default_port, low=1, high=65535),
            security=security,
            username=username,
            password=password,
            ca_file=self._path(t, "ca_file"),
            timeout=t.number("timeout", _default(SmtpRelay, "timeout"), low=0.1, high=600),
            max_connections=t.integer(
                "max_connections", _default(SmtpRelay, "max_connections"), low=1, high=100
            ),
            cooldown=t.number("cooldown", _default(SmtpRelay, "cooldown"), low=0, high=3600),
            rate_limit=t.number(
                "rate_limit", _default(SmtpRelay, "rate_limit"), low=0, high=100_000
            ),
            sender=_sender(t, "from", None),
            helo=t.text("helo", None),
        )
        if relay.helo is not None and not _HOSTNAME_RE.fullmatch(relay.helo):
            t.error("helo", f"not a host name: {relay.helo!r:.80}")
        t.finish()
        return relay

    def route(self, t: Table) -> Route:
        to = _recipients(t)
        match = _key_patterns(t, "match", allow_single=True)
        route = Route(
            to=to,
            match=match,
            min_level=t.choice("min_level", LEVELS, _default(Route, "min_level")),
        )
        t.finish()
        return route

    def filter(self, t: Table) -> FilterConfig:
        enable = _key_patterns(t, "enable")
        disable = _key_patterns(t, "disable")
        for both in sorted(set(enable) & set(disable)):
            t.error("enable", f"{both!r} is in both enable and disable")
        config = FilterConfig(
            min_level=t.choice("min_level", LEVELS, _default(FilterConfig, "min_level")),
            enable=enable,
            disable=disable,
            unknown=t.choice("unknown", (*LEVELS, "never"), _default(FilterConfig, "unknown")),
        )
        t.finish()
        return config

    def incident(self, t: Table) -> IncidentConfig:
        storm_by = t.str_list("storm_by", _default(IncidentConfig, "storm_by"))
        for i, name in enumerate(storm_by):
            if name not in STORM_BY:
                t.error(
                    f"storm_by[{i}]", f"expected one of {', '.join(STORM_BY)}, got {name!r:.40}"
                )
        if not storm_by:
            t.error("storm_by", f"at least one of {', '.join(STORM_BY)} is required")
        # Held events are unacked: a held event waits at most group_wait plus a storm
        # window, which must stay well under RabbitMQ's consumer ack timeout (30 minutes
        # by default), or the broker closes the channel and takes back everything held.
        config = IncidentConfig(
            group_wait=t.number(
                "group_wait", _default(IncidentConfig, "group_wait"), low=0, high=300
            ),
            repeat_interval=t.number(
                "repeat_interval",
                _default(IncidentConfig, "repeat_interval"),
                low=0,
                high=7 * 86400,
            ),
            storm_threshold=t.integer(
                "storm_threshold",
                _default(IncidentConfig, "storm_threshold"),
                low=0,
                high=1_000_000,
            ),
            storm_window=t.number(
                "storm_window", _default(IncidentConfig, "storm_window"), low=1, high=1200
            ),
            storm_by=tuple(dict.fromkeys(storm_by)),
            max_held=t.integer(
                "max_held", _default(IncidentConfig, "max_held"), low=1, high=10_000_000
            ),
            bundle=t.integer("bundle", _default(IncidentConfig, "bundle"), low=1, high=MAX_BUNDLE),
        )
        t.finish()
        return config

    def catalog(self, t: Table) -> CatalogConfig:
        raw = t.str_list("path", (), allow_single=True)
        paths = tuple(p if p.is_absolute() else self.base / p for p in (Path(r) for r in raw if r))
        t.finish()
        return CatalogConfig(paths=paths)


def _interval(t: Table, key: str, default: float, what: str) -> float:
    """Seconds between the pipeline's own messages: 0 (none of ``what``), or from one
    second to a day. Below a second they would be a flood, not a sign of life."""
    interval = t.number(key, default, low=0, high=86400)
    if 0 < interval < 1:
        t.error(key, f"must be 0 (no {what}) or at least 1 second")
    return float(interval)


def _canary(t: Table) -> CanaryConfig:
    to = _recipients(t, required=False)
    interval = _interval(t, "interval", CANARY_INTERVAL if to else 0.0, "canary")
    if interval and not to:
        t.error("to", "a recipient is required when interval is above 0 (or set interval = 0)")
    t.finish()
    return CanaryConfig(interval=interval, to=to)


def _default(settings: type, name: str) -> Any:
    """The default of setting ``name``, as its settings type states it: each default is
    written once, there, and the reader takes it from the type."""
    for f in dataclasses.fields(settings):
        if f.name == name:
            assert f.default is not dataclasses.MISSING, f"{settings.__name__}.{name}"
            return f.default
    raise AssertionError(f"{settings.__name__} has no setting {name}")


def _sender(t: Table, key: str, default: str | None) -> str | None:
    """A sender address ([mail] from, [[smtp]] from): plain ASCII, one address."""
    sender: str | None = t.text(key, default)
    if sender is not None and not _ADDRESS_RE.fullmatch(sender):
        t.error(key, f"not a plain e-mail address: {sender!r:.80}")
    return sender


def _recipients(t: Table, *, required: bool = True) -> tuple[str, ...]:
    """``to``: one or more plain addresses (shared by [mail], [[route]] and [canary])."""
    to: tuple[str, ...] = t.str_list("to", (), allow_single=True)
    if not to and required:
        t.error("to", "at least one recipient is required")
    for i, address in enumerate(to):
        if not _ADDRESS_RE.fullmatch(address):
            t.error(f"to[{i}]", f"not a plain e-mail address: {address!r:.80}")
    return to


def _key_patterns(t: Table, key: str, *, allow_single: bool = False) -> tuple[str, ...]:
    """A list of ``module:event_id`` patterns (wildcards allowed)."""
    patterns: tuple[str, ...] = t.str_list(key, (), allow_single=allow_single)
    for i, pattern in enumerate(patterns):
        if not is_key_pattern(pattern):
            t.error(
                f"{key}[{i}]", f"expected module:event_id (wildcards allowed), got {pattern!r:.60}"
            )
    return patterns


def _parse_broker_url(raw: str, where: str, problems: list[Problem]) -> BrokerUrl | None:
    def bad(message: str) -> None:
        # Never echo the raw URL: it may hold a password.
        problems.append(Problem(where, message))

    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        # The parser's message can quote part of the password; never show it.
        bad("not a valid URL (percent-encode special characters in the password)")
        return None
    if parts.scheme not in ("amqp", "amqps"):
        bad(f"scheme must be amqp or amqps, got {parts.scheme!r:.20}")
        return None
    if not parts.hostname:
        bad("no host name")
        return None
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    password = Secret(unquote(parts.password)) if parts.password is not None else None
    return BrokerUrl(
        scheme="amqps" if parts.scheme == "amqps" else "amqp",
        host=parts.hostname,
        port=port or (5671 if parts.scheme == "amqps" else 5672),
        vhost=vhost,
        username=unquote(parts.username) if parts.username else "guest",
        password=password,
    )
