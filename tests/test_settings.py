import re
import dataclasses
import tomllib
from pathlib import Path

import pytest

from config import PROJECT_DIR, Settings, SettingsError, build_arg_parser, load_settings


def test_defaults_come_from_the_settings_file():
    settings = load_settings([], environ={})
    assert (settings.host, settings.port, settings.share) == ("127.0.0.1", 7860, False)
    assert settings.attention == "auto" and settings.nan_check is True
    assert settings.output_dir == PROJECT_DIR / "outputs"


def test_environment_overrides_file_and_flags_override_environment():
    environ = {"ZIMAGE_PORT": "7999", "ZIMAGE_QUEUE_SIZE": "3", "ZIMAGE_NAN_CHECK": "false"}
    assert load_settings([], environ=environ).port == 7999
    settings = load_settings(["--port", "8001"], environ=environ)
    assert (settings.port, settings.queue_size, settings.nan_check) == (8001, 3, False)


def test_server_port_is_an_alias_of_port():
    assert load_settings(["--server-port", "7001"], environ={}).port == 7001


@pytest.mark.parametrize(("flags", "attention"), [
    (["--enable-xformers"], "xformers"),
    (["--disable-xformers"], "sdpa"),
    (["--attention", "flash"], "flash"),
])
def test_xformers_switches_map_onto_the_attention_setting(flags, attention):
    assert load_settings(flags, environ={}).attention == attention


def test_enable_and_disable_xformers_together_is_refused():
    with pytest.raises(SystemExit):
        load_settings(["--enable-xformers", "--disable-xformers"], environ={})


def test_disable_nan_check_turns_the_check_off():
    assert load_settings(["--disable-nan-check"], environ={}).nan_check is False


@pytest.mark.parametrize(("flags", "environ", "message"), [
    (["--max-h", "1000"], {}, "max_h must be a multiple of 16"),
    (["--port", "70000"], {}, "port must be between"),
    (["--queue-size", "0"], {}, "queue_size must be at least 1"),
    ([], {"ZIMAGE_PORT": "seven"}, "ZIMAGE_PORT has an unusable value"),
    ([], {"ZIMAGE_ATTENTION": "magic"}, "attention must be one of"),
])
def test_bad_values_name_the_setting(flags, environ, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(flags, environ=environ)


def test_settings_file_with_unknown_key_is_rejected(tmp_path):
    config = tmp_path / "site.toml"
    config.write_text('port = 7000\nportt = 7001\n')
    with pytest.raises(SettingsError, match="unknown keys: portt"):
        load_settings(["--config", str(config)], environ={})


def test_settings_file_is_read_over_the_defaults(tmp_path):
    config = tmp_path / "site.toml"
    config.write_text('model_dir = "/srv/weights"\nmax_w = 1536\n')
    settings = load_settings(["--config", str(config)], environ={})
    assert settings.model_dir == Path("/srv/weights") and settings.max_w == 1536


def test_every_setting_has_a_flag_in_help_a_default_and_a_readme_row():
    parser = build_arg_parser()
    help_text = parser.format_help()
    readme = (PROJECT_DIR / "README.md").read_text()
    defaults = tomllib.loads((PROJECT_DIR / "config" / "defaults.toml").read_text())
    flags_by_setting = {}
    for action in parser._actions:
        flags_by_setting.setdefault(action.dest, []).extend(action.option_strings)
    for field in dataclasses.fields(Settings):
        flags = flags_by_setting.get(field.name)
        assert flags, f"setting {field.name} has no flag"
        assert field.name in defaults, f"setting {field.name} has no default in config/defaults.toml"
        for flag in flags:
            assert flag in help_text
            assert f"`{flag}" in readme, f"{flag} is not in the README's flags table"


def test_speed_and_memory_settings_have_flags_and_environment_variables():
    settings = load_settings(["--no-compile", "--low-vram", "--gpu-memory-limit-gib", "16", "--prompt-cache-size", "0",
                              "--compile-cache-dir", "/tmp/zimage-cc"], environ={})
    assert (settings.compile, settings.low_vram, settings.gpu_memory_limit_gib, settings.prompt_cache_size) == (
        False, True, 16, 0)
    assert settings.compile_cache_dir == Path("/tmp/zimage-cc")
    assert load_settings([], environ={"ZIMAGE_COMPILE": "0"}).compile is False
    assert load_settings([], environ={}).compile is True


@pytest.mark.parametrize("flags, message", [
    (["--gpu-memory-limit-gib", "-1"], "gpu_memory_limit_gib"),
    (["--prompt-cache-size", "-3"], "prompt_cache_size"),
])
def test_negative_memory_settings_are_refused(flags, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(flags, environ={})


@pytest.mark.parametrize("flags", [["--host", "0.0.0.0"], ["--host", "10.1.2.3"], ["--host", "gpu-box.lan"]])
def test_a_public_bind_without_auth_is_refused(flags):
    with pytest.raises(SettingsError, match="without authentication.*--auth user:password.*--insecure-public"):
        load_settings(flags, environ={})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_auth(host):
    assert load_settings(["--host", host], environ={}).exposed is False


def _tls_files(tmp_path) -> list[str]:
    (tmp_path / "cert.pem").write_text("certificate")
    (tmp_path / "key.pem").write_text("key")
    return ["--ssl-certfile", str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "key.pem")]


def test_a_public_bind_is_allowed_with_auth_over_tls_or_when_insecure_is_explicit(tmp_path):
    users = tmp_path / "users"
    users.write_text("# operators\nalice:s3cret:with:colons\n\nbob:hunter2\n")
    users.chmod(0o600)
    settings = load_settings(["--host", "0.0.0.0", "--auth", "carol:pw", "--auth-file", str(users),
                              *_tls_files(tmp_path)], environ={})
    assert settings.tls and settings.credential_warnings([]) == []
    assert settings.credentials() == {"carol": "pw", "alice": "s3cret:with:colons", "bob": "hunter2"}
    assert "pw" not in str(settings.as_log_fields())
    assert load_settings(["--host", "0.0.0.0", "--insecure-public"], environ={}).credentials() == {}


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "gpu-box.lan"])
def test_passwords_in_clear_text_on_a_public_bind_are_refused_unless_insecure_is_explicit(host):
    with pytest.raises(SettingsError, match=f"clear text on host {host}.*--ssl-certfile and --ssl-keyfile.*"
                                            "--insecure-public"):
        load_settings(["--host", host, "--auth", "alice:pw"], environ={})
    settings = load_settings(["--host", host, "--auth", "alice:pw", "--insecure-public"], environ={})
    assert any("clear text" in warning for warning in settings.credential_warnings([]))


@pytest.mark.parametrize("flags, warned", [
    ([], False), (["--host", "10.1.2.3", "--insecure-public"], False),
    (["--host", "0.0.0.0", "--insecure-public"], True), (["--host", "::", "--insecure-public"], True),
    (["--host", "0.0.0.0", "--insecure-public", "--public-url", "https://gpu-box.example.com"], False),
])
def test_image_links_a_remote_client_cannot_reach_are_named_at_start(flags, warned):
    warning = load_settings(flags, environ={}).link_warning()
    assert (warning is not None) == warned
    assert warning is None or "--public-url" in warning


def test_loopback_takes_passwords_without_tls_of_its_own():
    assert not load_settings(["--auth", "alice:pw"], environ={}).tls
    assert load_settings(["--auth", "alice:pw"], environ={}).credential_warnings([]) == []


@pytest.mark.parametrize("flags", [["--share"], ["--share", "--auth", "alice:pw"], ["--share", "--insecure-public"]])
def test_a_share_link_is_refused_naming_why_and_what_to_use(flags):
    with pytest.raises(SettingsError, match="share links are not offered: Gradio makes one only for a server of its "
                                            "own launch\\(\\).*SSH tunnel"):
        load_settings(flags, environ={})


@pytest.mark.parametrize("value", ["127.0.0.1", "10.0.0.0/8, ::1", ""])
def test_trusted_proxies_are_addresses_or_networks(value):
    assert load_settings(["--trusted-proxy", value], environ={}).trusted_proxy == value


@pytest.mark.parametrize("value", ["*", "proxy.lan", "127.0.0.1 10.0.0.1", "10.0.0.0/33"])
def test_anything_else_as_a_trusted_proxy_is_refused(value):
    with pytest.raises(SettingsError, match="trusted_proxy must be IP addresses or networks"):
        load_settings(["--trusted-proxy", value], environ={})


def test_tls_needs_both_files_and_readable_ones(tmp_path):
    certificate, key = _tls_files(tmp_path)[1], _tls_files(tmp_path)[3]
    with pytest.raises(SettingsError, match="ssl_certfile and ssl_keyfile go together"):
        load_settings(["--ssl-certfile", certificate], environ={})
    with pytest.raises(SettingsError, match=f"ssl_keyfile {tmp_path}/missing.pem cannot be read"):
        load_settings(["--ssl-certfile", certificate, "--ssl-keyfile", str(tmp_path / "missing.pem")], environ={})
    assert load_settings(["--ssl-certfile", certificate, "--ssl-keyfile", key], environ={}).tls


@pytest.mark.parametrize("content, message", [("alice\n", "line 1 must be user:password"),
                                              ("ok:fine\n:nopassuser\n", "line 2 must be user:password")])
def test_a_malformed_auth_file_names_the_line(tmp_path, content, message):
    users = tmp_path / "users"
    users.write_text(content)
    with pytest.raises(SettingsError, match=message):
        load_settings(["--auth-file", str(users)], environ={})


def test_auth_must_be_user_colon_password_and_the_file_must_exist(tmp_path):
    with pytest.raises(SettingsError, match="auth must be user:password"):
        load_settings(["--auth", "justauser"], environ={})
    with pytest.raises(SettingsError, match="cannot be read"):
        load_settings(["--auth-file", str(tmp_path / "missing")], environ={})


def test_an_auth_file_of_only_comments_and_blank_lines_is_refused(tmp_path):
    users = tmp_path / "users"
    users.write_text("# alice:s3cret (disabled)\n\n   \n  # bob:hunter2\n")
    with pytest.raises(SettingsError, match=f"auth_file {users} holds no user:password line"):
        load_settings(["--auth-file", str(users)], environ={})


def test_a_world_readable_auth_file_and_a_password_on_the_command_line_are_warned_about(tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:s3cret\n")
    users.chmod(0o644)
    argv = ["--auth", "carol:pw", "--auth-file", str(users)]
    first, second = load_settings(argv, environ={}).credential_warnings(argv)
    assert "--auth password is visible to every user" in first and "ZIMAGE_AUTH" in first and "pw" not in first
    assert second == f"auth_file {users} is readable by every user of this machine (mode 644); chmod 600 {users}"


def test_a_private_auth_file_and_the_password_from_the_environment_are_not_warned_about(tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:s3cret\n")
    users.chmod(0o600)
    argv = ["--auth-file", str(users)]
    assert load_settings(argv, environ={"ZIMAGE_AUTH": "carol:pw"}).credential_warnings(argv) == []


@pytest.mark.parametrize("url", ["images.example.com", "ftp://images.example.com", "https://", "https://x/?a=1"])
def test_a_public_url_must_be_an_http_base_url(url):
    with pytest.raises(SettingsError, match="public_url must be an http:// or https:// base URL"):
        load_settings(["--public-url", url], environ={})
    assert load_settings(["--public-url", "https://images.example.com/zimage"], environ={}).public_url


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "two"], "replicas must be 0 (the engine in this process), a number of Ray Serve replicas or auto"),
    (["--replicas", "-1"], "replicas must be 0"),
    (["--ray-address", "127.0.0.1:6379"], "ray_address is for replicas"),
])
def test_replica_settings_that_cannot_work_are_refused_naming_the_setting(flags, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(flags, environ={})


def test_replicas_take_a_number_or_auto():
    assert load_settings(["--replicas", "auto"], environ={}).replicas == "auto"
    assert load_settings(["--replicas", "2", "--ray-address", "10.0.0.1:6379"], environ={}).ray_address == \
        "10.0.0.1:6379"
    assert load_settings([], environ={}).replicas == "0"
    # Each replica applies the 16 GB profile on its own GPU.
    profiled = load_settings(["--replicas", "2", "--low-vram", "--gpu-memory-limit-gib", "16"], environ={})
    assert (profiled.low_vram, profiled.gpu_memory_limit_gib) == (True, 16)
