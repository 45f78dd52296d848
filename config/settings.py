"""The service's settings: `defaults.toml`, then `ZIMAGE_*` environment variables, then command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import os
import stat
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.requests import SIZE_MULTIPLE  # the model's own size step: one definition

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = Path(__file__).resolve().parent / "defaults.toml"
ENV_PREFIX = "ZIMAGE_"

DeviceChoice = Literal["auto", "cuda", "cpu"]
AttentionChoice = Literal["auto", "sdpa", "flash", "xformers"]
LogPromptsChoice = Literal["none", "summary", "full"]
LogLevelChoice = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

# The largest side a flag may allow: 4096 keeps one image inside any GPU we target.
SIZE_CEILING = 4096


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names the setting and the fix."""


@dataclass(frozen=True)
class Settings:
    host: str  # interface to bind; 127.0.0.1 keeps the UI reachable only through an SSH tunnel
    port: int
    share: bool  # Gradio's share link: refused (the service runs its own server, which Gradio cannot share)
    auth: str  # "user:password" needed for every page and API route but the health checks; "" for none
    auth_file: str  # a file of "user:password" lines; "" for none
    insecure_public: bool  # serve a non-loopback host or share link without auth (or auth without TLS) anyway
    ssl_certfile: str  # PEM certificate: serve HTTPS; "" for plain HTTP
    ssl_keyfile: str  # PEM private key of that certificate; "" for plain HTTP
    public_url: str  # base of the URLs API answers hold (never the request's Host header); "" for the bound address
    # Proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (addresses or networks, comma-separated); ""
    # for none: every client is the address it connects from.
    trusted_proxy: str
    model_dir: Path  # weights: the three single files (layout A) or a diffusers folder (layout B)
    demo: bool  # serve the tiny random-weight model instead of real weights
    demo_dir: Path  # where --demo builds and caches the tiny model
    verify_weights: bool  # check every weight file's sha256 against manifest.json before loading
    device: DeviceChoice  # auto: CUDA when a GPU is visible, else CPU
    attention: AttentionChoice  # diffusers attention backend; a missing or failing one falls back to SDPA
    compile: bool  # CUDA only: regional compilation of the DiT blocks and the VAE decoder, in the background
    compile_cache_dir: Path  # Inductor and Triton caches: a warm one makes the compile after a restart take seconds
    # Compiling starts once the first request is answered, or this many seconds after ready if none comes first:
    # the compiler's Python slows every request served beside it, so a client retrying through a restart gets its
    # image before the compile begins.
    compile_delay_s: int
    low_vram: bool  # profile for 16 GB cards: text encoder streamed from CPU memory, VAE tiling above 1024 px
    gpu_memory_limit_gib: int  # cap on this process's GPU memory; 0 means the whole GPU
    prompt_cache_size: int  # how many prompts' embeddings are kept for reuse
    # LoRA adapters: every *.safetensors in this folder, named by its stem, looked at again as requests come; ""
    # for the folder "loras" beside the weights. No folder at start: no adapters (and no slots' memory or compile).
    lora_dir: str
    lora_max_rank: int  # the adapter slots' rank: one request's adapters' ranks together at most this; 0: off
    max_upload_mb: int  # an edit's uploaded picture and mask: each at most this many megabytes
    # ... and this many million pixels, read from the file's header before anything is decoded (a decompression
    # bomb of a kilobyte can claim 50,000 × 50,000)
    max_upload_megapixels: int
    max_h: int  # largest height a request may ask for (pixels)
    max_w: int  # largest width a request may ask for (pixels)
    queue_size: int  # requests that may wait for the GPU; more are turned away as "busy"
    # The engine in a child process that this one restarts when it dies (pipeline.engine_process): the page, the
    # queue and the requests waiting in it survive. False: in this process, which a crash ends with everything.
    engine_process: bool
    # "0": the engine runs on this host (no Ray). A number or "auto" (one per GPU of the cluster): that many
    # engines as Ray Serve replicas behind this front (the optional `scale` extra).
    replicas: str
    ray_address: str  # with replicas: the Ray cluster to join; "" starts a private one
    queue_timeout_s: int  # a request that waited longer than this is answered with a timeout, not run late
    max_connections: int  # open HTTP connections at once; idle ones are closed first to make room
    header_timeout_s: int  # a connection that has not sent a whole request (head and body) by then is closed
    send_timeout_s: int  # a connection whose client stops reading its answer for this long is cut off
    output_dir: Path  # every returned image is saved here as PNG
    nan_check: bool  # refuse NaN / all-black images instead of returning them
    log_level: LogLevelChoice
    log_prompts: LogPromptsChoice  # what of a prompt reaches the log: nothing, length+hash+first words, or all
    crash_dir: Path  # where a fatal error leaves its snapshot (JSON: stacks, GPU memory, last prompts)
    shutdown_grace_s: int  # on SIGTERM/SIGINT, the running job gets this long to finish before it is abandoned
    hang_timeout_s: int  # a generation running longer than this is hung: dump stacks, snapshot, exit non-zero

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"port must be between 1 and 65535 (got {self.port}).")
        if self.share:
            raise SettingsError("share links are not offered: Gradio makes one only for a server of its own launch(), "
                                "and this service runs its own. Reach it through an SSH tunnel (ssh -L "
                                "7860:127.0.0.1:7860 HOST), or a reverse proxy with TLS (README).")
        for proxy in filter(None, (part.strip() for part in self.trusted_proxy.split(","))):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(f"trusted_proxy must be IP addresses or networks, comma-separated, such as "
                                    f"127.0.0.1 or 10.0.0.0/8 (got {proxy!r}).") from None
        for name in ("max_h", "max_w"):
            value = getattr(self, name)
            if not SIZE_MULTIPLE <= value <= SIZE_CEILING or value % SIZE_MULTIPLE:
                raise SettingsError(
                    f"{name} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {SIZE_CEILING} "
                    f"(got {value})."
                )
        if self.hang_timeout_s < 1:
            raise SettingsError(f"hang_timeout_s must be at least 1 (got {self.hang_timeout_s}).")
        if self.compile_delay_s < 0:
            raise SettingsError(f"compile_delay_s must be 0 or more (got {self.compile_delay_s}).")
        if self.shutdown_grace_s < 0:
            raise SettingsError(f"shutdown_grace_s must be 0 or more (got {self.shutdown_grace_s}).")
        if self.queue_timeout_s < 1:
            raise SettingsError(f"queue_timeout_s must be at least 1 (got {self.queue_timeout_s}).")
        if self.gpu_memory_limit_gib < 0:
            raise SettingsError(f"gpu_memory_limit_gib must be 0 (no cap) or more (got {self.gpu_memory_limit_gib}).")
        if self.prompt_cache_size < 0:
            raise SettingsError(f"prompt_cache_size must be 0 (off) or more (got {self.prompt_cache_size}).")
        if self.lora_max_rank < 0:
            raise SettingsError(f"lora_max_rank must be 0 (no adapters) or more (got {self.lora_max_rank}).")
        for name in ("max_upload_mb", "max_upload_megapixels"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        if self.queue_size < 1:
            raise SettingsError(f"queue_size must be at least 1 (got {self.queue_size}).")
        if self.replicas != "auto" and not (self.replicas.isdigit() and self.replicas.isascii()):
            raise SettingsError(f"replicas must be 0 (the engine in this process), a number of Ray Serve replicas "
                                f"or auto (one per GPU) (got {self.replicas!r}).")
        if self.ray_address and self.replicas == "0":
            raise SettingsError("ray_address is for replicas: give --replicas N or auto with it.")
        if self.max_connections < 8:
            raise SettingsError(f"max_connections must be at least 8 (got {self.max_connections}).")
        if self.header_timeout_s < 1:
            raise SettingsError(f"header_timeout_s must be at least 1 (got {self.header_timeout_s}).")
        if self.send_timeout_s < 1:
            raise SettingsError(f"send_timeout_s must be at least 1 (got {self.send_timeout_s}).")
        credentials = self.credentials()
        if self.exposed and not credentials and not self.insecure_public:
            raise SettingsError(
                f"refusing to serve host {self.host} without authentication: anyone who reaches it could use the GPU "
                f"and see every image. Give --auth user:password or --auth-file FILE, or --insecure-public to accept "
                f"the risk."
            )
        self._check_tls(credentials)
        if self.public_url:
            parts = urllib.parse.urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise SettingsError(f"public_url must be an http:// or https:// base URL such as "
                                    f"https://images.example.com (got {self.public_url!r}).")
        for field in dataclasses.fields(self):
            choices = typing.get_args(_field_types()[field.name])
            if choices and getattr(self, field.name) not in choices:
                raise SettingsError(
                    f"{field.name} must be one of {', '.join(choices)} (got {getattr(self, field.name)!r})."
                )

    def _check_tls(self, credentials: dict[str, str]) -> None:
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise SettingsError("ssl_certfile and ssl_keyfile go together: give both, or neither.")
        for name in ("ssl_certfile", "ssl_keyfile"):
            if value := getattr(self, name):
                path = Path(value).expanduser()
                try:
                    path.open("rb").close()
                except OSError as error:
                    raise SettingsError(f"{name} {path} cannot be read: {error.strerror}.") from None
        if credentials and self.exposed and not self.tls and not self.insecure_public:
            raise SettingsError(
                f"refusing to take passwords in clear text on host {self.host}: anyone on the network path could "
                f"read them. Give --ssl-certfile and --ssl-keyfile, or bind to 127.0.0.1 behind a TLS reverse proxy "
                f"(README: TLS), or --insecure-public to accept the risk."
            )

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile and self.ssl_keyfile)

    @property
    def exposed(self) -> bool:
        """Reachable from other machines: bound to an address other than loopback."""
        if self.host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return True

    def credentials(self) -> dict[str, str]:
        """user → password from --auth and --auth-file; a malformed entry raises SettingsError naming it."""
        entries = [("auth", self.auth)] if self.auth else []
        if self.auth_file:
            path = Path(self.auth_file).expanduser()
            try:
                lines = path.read_text().splitlines()
            except OSError as error:
                raise SettingsError(f"auth_file {path} cannot be read: {error.strerror}.") from None
            from_file = [(f"auth_file {path} line {number}", line.strip()) for number, line in enumerate(lines, 1)
                         if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:  # served without the auth the operator meant to set up: worse than not starting
                raise SettingsError(f"auth_file {path} holds no user:password line (only comments or blank lines).")
            entries += from_file
        credentials = {}
        for source, entry in entries:
            user, colon, password = entry.partition(":")
            if not (colon and user and password):
                raise SettingsError(f"{source} must be user:password, both non-empty.")
            credentials[user] = password
        return credentials

    def credential_warnings(self, argv: Sequence[str] | None = None) -> list[str]:
        """Where other users of this machine can read a password, one sentence each, for the log at start. `argv` is
        what load_settings parsed (None: sys.argv), to tell --auth on the command line from ZIMAGE_AUTH."""
        warnings = []
        if self.auth and "auth" in _parse_flags(argv):
            warnings.append("the --auth password is visible to every user of this machine (ps, /proc/PID/cmdline); "
                            "use --auth-file FILE with mode 600, or the environment variable ZIMAGE_AUTH")
        if self.auth_file:
            path = Path(self.auth_file).expanduser()
            mode = path.stat().st_mode
            if mode & stat.S_IROTH:
                warnings.append(f"auth_file {path} is readable by every user of this machine (mode {mode & 0o777:o}); "
                                f"chmod 600 {path}")
        if self.exposed and not self.tls and (self.auth or self.auth_file):
            warnings.append(f"passwords reach host {self.host} in clear text (no --ssl-certfile; --insecure-public "
                            f"allowed it); anyone on the network path can read them")
        return warnings

    def link_warning(self) -> str | None:
        """Image links (the OpenAI route's response_format "url") start with --public-url or else the bound address,
        never a request's Host header; bound to every interface, that address is this machine's loopback, which
        no other machine reaches. One sentence for the log at start, or None."""
        if self.public_url or self.host not in ("", "0.0.0.0", "::"):
            return None
        return ("image links in API answers (response_format url) point at this machine's loopback address, "
                "which clients on other machines cannot reach; set --public-url to the address they use")

    def as_log_fields(self) -> dict[str, object]:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return fields | ({"auth": "(set)"} if self.auth else {})


@functools.cache
def _field_types() -> dict[str, object]:
    return typing.get_type_hints(Settings)


def _coerce(name: str, raw: object, source: str) -> object:
    kind = _field_types()[name]
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind is Path:
            path = Path(str(raw)).expanduser()
            return path if path.is_absolute() else PROJECT_DIR / path
        if kind is LogLevelChoice:
            return str(raw).upper()
        return str(raw)
    except ValueError:
        raise SettingsError(f"{name} from {source} has an unusable value {raw!r}.") from None


def _read_file(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"settings file {path} is not valid TOML: {error}.") from None
    unknown = sorted(set(values) - set(_field_types()))
    if unknown:
        raise SettingsError(f"settings file {path} has unknown keys: {', '.join(unknown)}.")
    return {name: _coerce(name, value, str(path)) for name, value in values.items()}


def _read_env(environ: Mapping[str, str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name in _field_types():
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = _coerce(name, environ[key], f"environment variable {key}")
    return values


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = _read_file(DEFAULTS_FILE)
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Z-Image-Turbo text-to-image service: one BF16 pipeline behind a Gradio UI.",
        epilog=f"Defaults come from {DEFAULTS_FILE.relative_to(PROJECT_DIR)}; "
        f"each setting can also be given as {ENV_PREFIX}<NAME> in the environment (flags win).",
        argument_default=argparse.SUPPRESS,
    )

    def add(*flags: str, help: str, **kwargs: object) -> None:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        if dest in defaults and "default:" not in help:
            shown = defaults[dest]
            if isinstance(shown, Path):
                shown = os.path.relpath(shown, PROJECT_DIR) if shown.is_relative_to(PROJECT_DIR) else shown
            help = f"{help} (default: {shown})"
        parser.add_argument(*flags, help=help, **kwargs)

    add("--config", dest="config_file", type=Path, metavar="FILE",
        help="a TOML settings file read over the defaults, with the same keys as config/defaults.toml")
    add("--host", help="interface to bind; anything but loopback exposes the UI to the network")
    add("--port", "--server-port", dest="port", type=int, help="TCP port of the UI")
    add("--share", action="store_true",
        help="refused: Gradio shares only a server of its own launch(); use an SSH tunnel or a TLS reverse proxy")
    add("--auth", metavar="USER:PASSWORD",
        help="require these credentials for the UI and every API route (HTTP Basic, or the password-bearing "
        "'USER:PASSWORD' as an OpenAI API key); /healthz and /readyz stay open")
    add("--auth-file", metavar="FILE", help="like --auth, one USER:PASSWORD per line (# comments allowed)")
    add("--insecure-public", action="store_true",
        help="serve a non-loopback --host without --auth (refused otherwise)")
    add("--ssl-certfile", metavar="FILE",
        help="serve HTTPS with this PEM certificate (with --ssl-keyfile); required with --auth on a non-loopback "
        "--host unless --insecure-public")
    add("--ssl-keyfile", metavar="FILE", help="the certificate's PEM private key")
    add("--public-url", metavar="URL",
        help="the base URL clients reach the service at, e.g. https://images.example.com behind a reverse proxy; "
        "image URLs in API answers and the page's own URLs start with it (default: the address the service "
        "binds, and for the page the address each request came to)")
    add("--trusted-proxy", metavar="ADDRESSES",
        help="reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are believed, comma-separated addresses "
        "or networks (e.g. 127.0.0.1); from any other client those headers are ignored (default: none)")
    add("--model-dir", type=Path, metavar="DIR",
        help="weights directory: the three single files (layout A) or a diffusers folder (layout B)")
    add("--demo", action="store_true",
        help="serve a tiny random-weight model (built on first use) instead of real weights")
    add("--demo-dir", type=Path, metavar="DIR", help="where --demo builds and caches its tiny model")
    add("--verify-weights", action="store_true",
        help="check each weight file's sha256 against manifest.json in the model directory before loading")
    add("--device", choices=typing.get_args(DeviceChoice), help="where the model runs")
    add("--attention", choices=typing.get_args(AttentionChoice),
        help="attention backend (sdpa = PyTorch scaled_dot_product_attention); "
        "a backend that is missing or fails its first call falls back to sdpa with a warning")
    xformers = parser.add_mutually_exclusive_group()
    xformers.add_argument("--enable-xformers", dest="attention", action="store_const", const="xformers",
                          help="same as --attention xformers")
    xformers.add_argument("--disable-xformers", dest="attention", action="store_const", const="sdpa",
                          help="same as --attention sdpa")
    add("--compile", action=argparse.BooleanOptionalAction,
        help="on CUDA, compile the DiT's repeated blocks and the VAE decoder in the background after start; "
        "the eager path serves meanwhile (where the GPU has room for both) and the compiled one takes over when warm")
    add("--compile-cache-dir", type=Path, metavar="DIR",
        help="where compiled kernels are kept across restarts (a warm cache makes compiling take seconds)")
    add("--compile-delay", dest="compile_delay_s", type=int, metavar="SECONDS",
        help="the text encoder's CUDA graphs, then compiling, start when the first request has been answered, or "
        "this long after ready if none comes")
    add("--low-vram", action="store_true",
        help="profile for 16 GB GPUs: the text encoder stays in CPU memory and streams to the GPU layer by layer; "
        "the VAE decodes in tiles above 1024 px")
    add("--gpu-memory-limit-gib", type=int, metavar="GIB",
        help="cap this process's GPU memory (0: the whole GPU); requests that would not fit are refused at once")
    add("--prompt-cache-size", type=int, metavar="N",
        help="prompts whose text embeddings are kept, so new seeds for the same prompt skip the text encoder "
        "(0: off)")
    add("--lora-dir", metavar="DIR",
        help="LoRA adapters: every *.safetensors here, named by its file's stem, read at start and again when the "
        "folder changes (looked at as requests come); empty: the folder loras beside the weights. No such folder at "
        "start: no adapters")
    add("--lora-max-rank", type=int, metavar="R",
        help="rank of the adapter slots: the ranks of one request's adapters together at most this (GPU memory: "
        "about 6 MB per unit of rank for the full DiT in bf16); 0: adapters off")
    add("--max-upload-mb", type=int, metavar="MB",
        help="largest picture (and mask) an edit may upload, in megabytes")
    add("--max-upload-megapixels", type=int, metavar="MP",
        help="largest picture (and mask) an edit may upload, in millions of pixels, checked from the file's header "
        "before it is decoded")
    add("--max-h", type=int, metavar="PX", help="largest image height a request may ask for")
    add("--max-w", type=int, metavar="PX", help="largest image width a request may ask for")
    add("--queue-size", type=int, metavar="N", help="requests that may wait for the GPU before new ones are refused")
    add("--engine-process", action=argparse.BooleanOptionalAction,
        help="run the engine in a child process that this one restarts when it dies, in seconds (a standby has "
        "the libraries imported): the page, the queue and waiting requests survive, the running job gets a "
        "retryable error; --no-engine-process runs it in this process")
    add("--replicas", metavar="N|auto",
        help="past one GPU: run N engines (auto: one per GPU of the Ray cluster) as Ray Serve replicas behind this "
        "one UI and queue, N jobs at a time; needs the scale extra (scripts/setup.sh --scale). 0: one engine on this "
        "host, Ray never imported")
    add("--ray-address", metavar="HOST:PORT",
        help="with --replicas: join this Ray cluster (ray start --head on this host, workers on others) instead of "
        "starting a private one")
    add("--queue-timeout", dest="queue_timeout_s", type=int, metavar="SECONDS",
        help="a request that waited longer than this for the GPU gets a clear timeout instead of running late")
    add("--max-connections", type=int, metavar="N",
        help="open HTTP connections at once; past it the oldest connection still sending its request is closed "
        "(the open-file limit is raised to fit)")
    add("--header-timeout", dest="header_timeout_s", type=int, metavar="SECONDS",
        help="a connection that has not sent a whole request, head and body, this long after connecting (or after "
        "its last response) is closed")
    add("--send-timeout", dest="send_timeout_s", type=int, metavar="SECONDS",
        help="a connection whose client stops reading its answer (takes less than 64 KiB of it) this long, "
        "while more waits to be sent, is cut off")
    add("--output-dir", type=Path, metavar="DIR", help="where every returned image is saved as PNG")
    add("--disable-nan-check", dest="nan_check", action="store_false",
        help="return images even when they contain NaN or are all black (default: check on)")
    add("--log-level", choices=typing.get_args(LogLevelChoice), type=str.upper, help="log verbosity")
    add("--log-prompts", choices=typing.get_args(LogPromptsChoice),
        help="how prompts are logged: none, summary (length, hash, first words) or full")
    add("--crash-dir", type=Path, metavar="DIR",
        help="where a fatal error writes its snapshot (thread stacks, GPU memory, last prompts)")
    add("--hang-timeout", dest="hang_timeout_s", type=int, metavar="SECONDS",
        help="a generation running longer than this counts as hung: stacks go to the log, a snapshot is written "
        "and the process exits 1 for supervisor to restart")
    add("--shutdown-grace", dest="shutdown_grace_s", type=int, metavar="SECONDS",
        help="on SIGTERM or SIGINT, how long the running job may take to finish before it is abandoned")
    return parser


def _parse_flags(argv: Sequence[str] | None) -> dict[str, object]:
    """Only the flags given on the command line (argv None: sys.argv), by setting name."""
    return vars(build_arg_parser().parse_args(argv))


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse flags and merge them over the environment and the settings files; bad values raise SettingsError."""
    flags = _parse_flags(argv)
    values = _read_file(DEFAULTS_FILE)
    config_file = flags.pop("config_file", None)
    if config_file is not None:
        values.update(_read_file(config_file))
    values.update(_read_env(os.environ if environ is None else environ))
    values.update({name: _coerce(name, value, "the command line") for name, value in flags.items()})
    missing = sorted(set(_field_types()) - set(values))
    if missing:
        raise SettingsError(f"no value for {', '.join(missing)}: add them to {DEFAULTS_FILE}.")
    return Settings(**values)
