"""Configuration: interpolation, validation, one-line errors with exit code 2, secrets never shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sync.config import load_config
from sync.errors import ConfigError

GOOD = """
database:
  url: postgresql://postgres@127.0.0.1:5432/postgres
servicetitan:
  tenant_id: ${ST_TENANT_ID:-42}
  client_id: cid
  client_secret: ${ST_CLIENT_SECRET}
  app_key: app-key-value-123
  application_guid: 00000000-0000-0000-0000-000000000001
sync:
  conflict_policy: newest_wins
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "stsync.yaml"
    p.write_text(text)
    return p


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ST_", "STSYNC_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sync", *args], capture_output=True, text=True, env=full_env,
                          timeout=60)


def test_interpolates_env_vars_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={"ST_CLIENT_SECRET": "s3cr3t-value"})
    assert cfg.servicetitan.tenant_id == 42
    assert cfg.servicetitan.client_secret.get_secret_value() == "s3cr3t-value"
    assert cfg.sync.conflict_policy == "newest_wins"
    assert cfg.database.schema_ == "stsync"
    assert cfg.servicetitan.mirror_id_key == "mirrorId"
    assert cfg.servicetitan.requests_per_second == 60


def test_env_var_overrides_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={"ST_CLIENT_SECRET": "x" * 8, "ST_TENANT_ID": "7"})
    assert cfg.servicetitan.tenant_id == 7


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    text = GOOD.replace("postgres@", "postgres:dbpass-998877@")
    cfg = load_config(write(tmp_path, text), env={"ST_CLIENT_SECRET": "s3cr3t-value"})
    shown = repr(cfg) + str(cfg)
    assert "s3cr3t-value" not in shown
    assert "app-key-value-123" not in shown
    assert "dbpass-998877" not in shown


def test_production_and_integration_hosts(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={"ST_CLIENT_SECRET": "x"})
    assert cfg.servicetitan.api_root == "https://api-integration.servicetitan.io"
    assert cfg.servicetitan.token_url == "https://auth-integration.servicetitan.io/connect/token"
    prod = load_config(write(tmp_path, GOOD + "\n".join(["", ""])).as_posix(), env={"ST_CLIENT_SECRET": "x"})
    assert prod.servicetitan.environment == "integration"


def test_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "example.yaml"
    env = {"DATABASE_URL": "postgresql://u@h/db", "ST_TENANT_ID": "123", "ST_CLIENT_ID": "c",
           "ST_CLIENT_SECRET": "s", "ST_APP_KEY": "k", "ST_APPLICATION_GUID": "g"}
    cfg = load_config(example, env=env)
    assert cfg.servicetitan.tenant_id == 123


BAD_CASES = {
    "unknown_key": (GOOD + "\nbogus_section: 1\n", "bogus_section: unknown key"),
    "unknown_nested_key": (GOOD.replace("conflict_policy", "conflict_polcy"), "sync.conflict_polcy: unknown key"),
    "missing_required": (GOOD.replace("  client_id: cid\n", ""), "servicetitan.client_id: required key is missing"),
    "wrong_type": (GOOD.replace("${ST_TENANT_ID:-42}", "forty-two"), "servicetitan.tenant_id: input should be a valid integer"),
    "bad_enum": (GOOD.replace("newest_wins", "coin_flip"), "sync.conflict_policy: input should be"),
    "unset_env_var": (GOOD.replace("cid", "${ST_CLIENT_ID}"), "servicetitan.client_id: environment variable ST_CLIENT_ID is not set"),
    "invalid_yaml": ("servicetitan: [unclosed\n", "invalid YAML: line"),
    "not_a_mapping": ("- a\n- b\n", "the top level must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CASES[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"ST_CLIENT_SECRET": "s3cr3t-value"})
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    proc = run_cli("--config", str(path), "check-config", env={"ST_CLIENT_SECRET": "s3cr3t-value"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0] and str(path) in lines[0]
    assert "s3cr3t-value" not in proc.stderr


def test_unreadable_file_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = run_cli("--config", str(missing), "check-config")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"stsync: error: {missing}: file not found"
    directory = tmp_path / "adir.yaml"
    directory.mkdir()
    proc = run_cli("--config", str(directory), "check-config")
    assert proc.returncode == 2
    assert "cannot read the file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_no_config_given_exit_2() -> None:
    proc = run_cli("check-config")
    assert proc.returncode == 2
    assert "pass --config PATH or set STSYNC_CONFIG" in proc.stderr


def test_wrong_type_does_not_echo_secret(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("app-key-value-123", "[a, list]"))
    proc = run_cli("--config", str(path), "check-config", env={"ST_CLIENT_SECRET": "x"})
    assert proc.returncode == 2
    assert "servicetitan.app_key" in proc.stderr


def test_check_config_ok_hides_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    proc = run_cli("--config", str(path), "check-config", env={"ST_CLIENT_SECRET": "s3cr3t-value"})
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK: tenant 42" in proc.stdout
    assert "s3cr3t-value" not in proc.stdout + proc.stderr
    assert "app-key-value-123" not in proc.stdout + proc.stderr


def test_config_from_env_var_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    proc = run_cli("check-config", env={"STSYNC_CONFIG": str(path), "ST_CLIENT_SECRET": "x"})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("url", ["mysql://root@localhost/db", "not a url", "postgresql://h:notaport/db"])
@pytest.mark.parametrize("source", ["flag", "STSYNC_DATABASE_URL", "DATABASE_URL"])
def test_a_bad_database_url_from_the_flag_or_the_environment_is_one_line_exit_2(tmp_path: Path, url: str,
                                                                                  source: str) -> None:
    cfg = write(tmp_path, GOOD.replace("  url: postgresql://postgres@127.0.0.1:5432/postgres\n", "")
                if source == "DATABASE_URL" else GOOD)
    args = ["--config", str(cfg)] + (["--database-url", url] if source == "flag" else []) + ["status"]
    env = {"ST_CLIENT_SECRET": "s3cret"}
    if source != "flag":
        env[source] = url
    proc = run_cli(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stsync: error: "), proc.stderr
    assert "postgresql://" in lines[0] and ("DATABASE_URL" in lines[0] or "--database-url" in lines[0])
    assert "notaport" not in lines[0] and "root@" not in lines[0]  # the URL itself is never echoed


def test_a_postgres_scheme_url_from_the_flag_is_accepted(tmp_path: Path) -> None:
    proc = run_cli("--config", str(write(tmp_path, GOOD)), "--database-url",
                   "postgres://postgres@127.0.0.1:5432/postgres", "check-config", env={"ST_CLIENT_SECRET": "s"})
    assert proc.returncode == 0, proc.stderr
