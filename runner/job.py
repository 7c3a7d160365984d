"""The job file: parse TOML and validate every key into frozen dataclasses, before anything runs.

Everyone imports this module; it imports nothing of ours but the error family.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from runner.errors import JobError

SANDBOX = "sandbox"
TRANSCODABLE = ("avif", "heif", "jp2", "psd")
# Services that take fewer than 10 records per request (docs/api-protocol.md).
ENDPOINT_BATCH_CAPS = {
    "card-grader/v2/grade": 2,
    "upscaler/2x/upscale": 1,
    "upscaler/4x/upscale": 1,
    "upscaler/8x/upscale": 1,
}
SANDBOX_DEFAULT_PATH = "collectibles/v2/tcg_id"
AUTH_SCHEMES = ("token", "jwt", "auto")
JWT_MIN_LENGTH = 70  # "auto": a token this long is a JWT


@dataclass(frozen=True)
class SourceConfig:
    paths: tuple[str, ...] = ()
    manifest: str | None = None
    recursive: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    follow_symlinks: bool = False  # like rsync and rclone: a symlink is skipped unless asked


@dataclass(frozen=True)
class ApiConfig:
    endpoint: str = SANDBOX
    token_env: str = "XIMILAR_TOKEN"
    fields: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 10
    concurrency: int = 4
    timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    max_retries: int = 5
    breaker_failures: int = 5  # batches in a row whose retries ran out on the service's failures
    breaker_s: float = 30.0  # or every request failed for this long: stop, exit 69
    auth_scheme: str = "auto"  # "token" | "jwt" | "auto" (JWT for tokens of 70+ characters)


@dataclass(frozen=True)
class ImagePolicy:
    max_side: int = 0
    transcode: tuple[str, ...] = ()
    send: str = "base64"
    max_pixels: int = 64_000_000
    max_bytes: int = 100_000_000  # a larger source file is never read: failed too_large_file


@dataclass(frozen=True)
class CreditsConfig:
    per_image: int = 10
    reuse: bool = True
    # Spending limits (runner/limits.py): a key left out is no limit; 0 means spend nothing.
    budget: int | None = None  # the job's total over its whole life
    per_run: int | None = None
    per_day: int | None = None  # calendar day in `timezone`
    per_month: int | None = None
    timezone: str = "UTC"  # an IANA name
    min_account_credits: int | None = None  # stop before the account's remaining credits fall below


@dataclass(frozen=True)
class RunConfig:
    max_duration: str | None = None  # "90s", "45m", "2h", "1h30m": stop taking new batches after it


@dataclass(frozen=True)
class StateConfig:
    db: str = ""


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "local"
    address: str | None = None
    workers: int = 0


@dataclass(frozen=True)
class MonitoringConfig:
    metrics_file: str | None = None  # node_exporter textfile; resolved against the job's folder


@dataclass(frozen=True)
class SandboxSettings:
    """Faults and limits the embedded emulator produces; all off by default."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    p429: float = 0.0
    retry_after_s: float = 1.0
    p500: float = 0.0
    p502: float = 0.0
    pdrop: float = 0.0
    prefuse: float = 0.0
    precord_retry: float = 0.0
    rate_limit_rps: float = 0.0
    credits: int = 1_000_000
    credits_per_record: int = 10
    max_records: int = 10
    max_image_bytes: int = 0
    token: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class Job:
    name: str
    path: Path
    source: SourceConfig
    api: ApiConfig
    images: ImagePolicy
    credits: CreditsConfig
    state: StateConfig
    executor: ExecutorConfig
    sandbox: SandboxSettings
    run: RunConfig = field(default_factory=RunConfig)
    token: str | None = field(default=None, repr=False, compare=False)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def db_path(self) -> Path:
        return resolve_local(self.base_dir, self.state.db)

    @property
    def uses_sandbox(self) -> bool:
        return self.api.endpoint == SANDBOX

    def request_signature(self, endpoint: str | None = None) -> str:
        """What makes an answer belong to a request besides the bytes: endpoint and fields."""
        body = json.dumps(
            {"endpoint": endpoint or self.api.endpoint, "fields": dict(self.api.fields)},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]


def resolve_local(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p).resolve()


_URL_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(value: str) -> bool:
    return "://" in value and _URL_SCHEME.match(value) is not None


def resolve_source(base: Path, value: str) -> str:
    """A URL stays as it is; a local path becomes absolute, relative to the job file's folder."""
    if is_url(value):
        return value
    trailing = "/" if value.endswith(("/", os.sep)) else ""
    return str(resolve_local(base, value)) + trailing


# --- validation --------------------------------------------------------------------------------

_SECTIONS = {
    "source": SourceConfig,
    "api": ApiConfig,
    "images": ImagePolicy,
    "credits": CreditsConfig,
    "state": StateConfig,
    "executor": ExecutorConfig,
    "sandbox": SandboxSettings,
    "monitoring": MonitoringConfig,
    "run": RunConfig,
}
# Keys whose default is None but whose value is an integer (a limit left out is no limit).
_OPTIONAL_INTS = {"credits.budget", "credits.per_run", "credits.per_day", "credits.per_month",
                  "credits.min_account_credits"}


def _type_name(t: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list", dict: "a table"}.get(t, str(t))


def _expect(key: str, value: Any, kind: type) -> Any:
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JobError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise JobError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise JobError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise JobError(f"{key}: expected {_type_name(kind)}, got {value!r}")
    return value


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    _expect(key, value, list)
    for v in value:
        if not isinstance(v, str):
            raise JobError(f"{key}: expected a list of strings, got {v!r}")
    return tuple(value)


def _finite_values(key: str, value: Any) -> None:
    """NaN and infinities are refused anywhere in a free-form table (they are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise JobError(f"{key}: {value!r} is not a finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _finite_values(f"{key}.{k}", v)
    elif isinstance(value, list | tuple):
        for v in value:
            _finite_values(key, v)


def _range(key: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise JobError(f"{key}: {value!r} is not a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise JobError(f"{key}: {value!r} is out of range ({bounds})")


def _section(name: str, raw: Any) -> dict[str, Any]:
    """Check a table's keys against its dataclass; return the typed values given."""
    cls = _SECTIONS[name]
    if not isinstance(raw, dict):
        raise JobError(f"{name}: expected a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in known:
            raise JobError(f"{full}: unknown key (known: {', '.join(sorted(known))})")
        default = getattr(cls(), key)
        if full in _OPTIONAL_INTS:
            out[key] = _expect(full, value, int)
        elif isinstance(default, tuple):
            out[key] = _str_list(full, value)
        elif isinstance(default, Mapping):
            out[key] = dict(_expect(full, value, dict))
        elif isinstance(default, bool):
            out[key] = _expect(full, value, bool)
        elif isinstance(default, int):
            out[key] = _expect(full, value, int)
        elif isinstance(default, float):
            out[key] = _expect(full, value, float)
        else:  # str or optional str
            if value is not None:
                _expect(full, value, str)
            out[key] = value
    return out


def parse_job(text: str, path: Path, env: Mapping[str, str] | None = None, *,
              require_token: bool = True) -> Job:
    """Validate a job file's text; raises JobError naming the first key that is wrong.

    require_token=False serves the commands that send nothing (plan, status, export, retry).
    """
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{path}: not valid TOML: {exc}") from None

    raw = dict(raw)
    name = raw.pop("name", None)
    if name is None:
        raise JobError("name: missing (every job needs a name, its identity in the state database)")
    _expect("name", name, str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise JobError(f"name: {name!r} must be letters, digits, '.', '_' or '-'")

    for key in raw:
        if key not in _SECTIONS:
            hint = " (it belongs in [credits])" if key == "reuse" else ""
            raise JobError(f"{key}: unknown key{hint} (known: name, {', '.join(_SECTIONS)})")
    given = {sec: _section(sec, raw.get(sec, {})) for sec in _SECTIONS}

    source = SourceConfig(**given["source"])
    base = path.parent
    if not source.paths and not source.manifest:
        raise JobError("source.paths: give at least one path, or source.manifest")
    # Checked before resolving: "" would become the job file's folder and list all of it.
    if any(not p.strip() for p in source.paths):
        raise JobError("source.paths: an empty string is not a path (write \".\" for the job "
                       "file's folder)")
    if source.manifest is not None and not source.manifest.strip():
        raise JobError("source.manifest: an empty string is not a path")
    source = replace(
        source,
        paths=tuple(resolve_source(base, p) for p in source.paths),
        manifest=resolve_source(base, source.manifest) if source.manifest else None,
    )

    api = ApiConfig(**given["api"])
    if api.endpoint != SANDBOX and not re.match(r"^https?://[^/\s]+", api.endpoint):
        raise JobError(f"api.endpoint: {api.endpoint!r} is neither \"sandbox\" nor an http(s) URL")
    cap = endpoint_batch_cap(api.endpoint)
    if "batch_size" in given["api"]:
        _range("api.batch_size", api.batch_size, 1, cap)
    else:
        api = replace(api, batch_size=min(api.batch_size, cap))
    _range("api.concurrency", api.concurrency, 1, 256)
    _range("api.timeout_s", api.timeout_s, 0.1, 86_400)
    _range("api.connect_timeout_s", api.connect_timeout_s, 0.1, 3_600)
    _range("api.max_retries", api.max_retries, 0, 100)
    _range("api.breaker_failures", api.breaker_failures, 1, 1000)
    _range("api.breaker_s", api.breaker_s, 0.1, 3600)
    if api.auth_scheme not in AUTH_SCHEMES:
        raise JobError(f"api.auth_scheme: {api.auth_scheme!r} must be \"token\", \"jwt\" or "
                       "\"auto\"")
    _finite_values("api.fields", api.fields)
    if "records" in api.fields:
        raise JobError("api.fields: 'records' is built by ximrun and cannot be a field")

    images = ImagePolicy(**given["images"])
    _range("images.max_side", images.max_side, 0, 1_000_000)
    _range("images.max_pixels", images.max_pixels, 1, 10**12)
    _range("images.max_bytes", images.max_bytes, 1, 10**12)
    for fmt in images.transcode:
        if fmt not in TRANSCODABLE:
            raise JobError(f"images.transcode: {fmt!r} is not one of {', '.join(TRANSCODABLE)}")
    if images.send not in ("base64", "url"):
        raise JobError(f"images.send: {images.send!r} must be \"base64\" or \"url\"")

    credits = CreditsConfig(**given["credits"])
    _range("credits.per_image", credits.per_image, 0, 10**9)
    for key in ("budget", "per_run", "per_day", "per_month", "min_account_credits"):
        if getattr(credits, key) is not None:
            _range(f"credits.{key}", getattr(credits, key), 0, 10**15)
    check_timezone("credits.timezone", credits.timezone)

    run = RunConfig(**given["run"])
    if run.max_duration is not None:
        parse_duration("run.max_duration", run.max_duration)

    state = StateConfig(**given["state"])
    if not state.db:
        state = StateConfig(db=f"state/{name}.db")

    executor = ExecutorConfig(**given["executor"])
    if executor.kind not in ("local", "dask"):
        raise JobError(f"executor.kind: {executor.kind!r} must be \"local\" or \"dask\"")
    if executor.address is not None and executor.kind != "dask":
        raise JobError("executor.address: only meaningful with kind = \"dask\"")
    _range("executor.workers", executor.workers, 0, 1024)

    sandbox = SandboxSettings(**given["sandbox"])
    if given["sandbox"] and api.endpoint != SANDBOX:
        raise JobError("sandbox: this table only applies with api.endpoint = \"sandbox\"")
    validate_sandbox(sandbox)

    monitoring = MonitoringConfig(**given["monitoring"])
    if monitoring.metrics_file is not None:
        if not monitoring.metrics_file.strip():
            raise JobError("monitoring.metrics_file: an empty string is not a path")
        monitoring = MonitoringConfig(
            metrics_file=str(resolve_local(base, monitoring.metrics_file)))

    token: str | None = None
    if api.endpoint != SANDBOX:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api.token_env):
            raise JobError(f"api.token_env: {api.token_env!r} is not a variable name")
        # A secret file's trailing newline is not part of the token; whatever else cannot travel
        # in an HTTP header is refused here, before an HTTP library echoes it into an error.
        token = (env.get(api.token_env) or "").strip() or None
        if token is not None and not re.fullmatch(r"[\x21-\x7e]+", token):
            raise JobError(f"api.token_env: the token in {api.token_env} has spaces, control or "
                           "non-ASCII characters (not shown here)")
        if token is None and require_token:
            raise JobError(
                f"api.token_env: the variable {api.token_env} is not set "
                "(the token is read from the environment, never from the job file)"
            )

    return Job(name=name, path=path, source=source, api=api, images=images, credits=credits,
               state=state, executor=executor, sandbox=sandbox, run=run, token=token,
               monitoring=monitoring)


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(key: str, text: str) -> float:
    """Seconds in "90s", "45m", "2h", "1h30m" (or a bare number of seconds); JobError naming
    `key` otherwise."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        seconds = float(t)
    else:
        m = _DURATION.fullmatch(t)
        if not t or m is None or not any(m.groups()):
            raise JobError(f"{key}: {text!r} is not a duration (for example 90s, 45m, 2h, 1h30m)")
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + se
    if seconds <= 0:
        raise JobError(f"{key}: {text!r} must be longer than 0")
    return seconds


def check_timezone(key: str, name: str) -> None:
    """An IANA time zone name that zoneinfo knows; JobError naming `key` otherwise."""
    import zoneinfo

    try:
        if not name or name != name.strip():
            raise ValueError
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise JobError(f"{key}: {name!r} is not a time zone name zoneinfo knows "
                       "(for example UTC, Europe/Prague, America/New_York)") from None


def validate_sandbox(s: SandboxSettings) -> None:
    for key in ("p429", "p500", "p502", "pdrop", "prefuse", "precord_retry"):
        _range(f"sandbox.{key}", getattr(s, key), 0.0, 1.0)
    for key, hi in (("latency_ms", 600_000), ("jitter_ms", 600_000), ("retry_after_s", 3_600),
                    ("rate_limit_rps", 1_000_000), ("credits", 10**15),
                    ("credits_per_record", 10**9), ("max_image_bytes", 10**12)):
        _range(f"sandbox.{key}", getattr(s, key), 0, hi)
    _range("sandbox.max_records", s.max_records, 1, 100)


def endpoint_batch_cap(endpoint: str) -> int:
    for suffix, cap in ENDPOINT_BATCH_CAPS.items():
        if endpoint.rstrip("/").endswith(suffix):
            return cap
    return 10


def load_job(path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *,
             require_token: bool = True) -> Job:
    p = Path(path).expanduser().resolve()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{path}: no such job file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: cannot read the job file: {exc}") from None
    return parse_job(text, p, env, require_token=require_token)
