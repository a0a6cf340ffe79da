"""No credential in any text the suite writes: URL userinfo, secret query values, values from ${oc.env:...}."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.redaction import redact, strip_credentials
from experiments.config import flatten, load_config, to_container, to_yaml
from experiments.tracking import redact_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, expected", [
    ("http://u:sk-canary-2@127.0.0.1:9/v1", "http://***@127.0.0.1:9/v1"),
    ("https://token@host/v1 and ftp://a:b@c/", "https://***@host/v1 and ftp://***@c/"),
    ("https://host/v1?api_key=sk-1&model=x", "https://host/v1?api_key=***&model=x"),
    ("https://host/v1?x=1&access_token=abc#frag", "https://host/v1?x=1&access_token=***#frag"),
    ("https://host/v1?Signature=zz&sig=yy", "https://host/v1?Signature=***&sig=***"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("user@example.com wrote", "user@example.com wrote"),
])
def test_url_credentials_are_masked(text, expected):
    assert strip_credentials(text) == expected


def test_oc_env_values_are_masked_in_config_yaml_params_and_tags(monkeypatch):
    secret = "sk-env-7c1d0e"
    monkeypatch.setenv("PERSONAFUSE_TEST_SECRET", secret)
    cfg = load_config(ROOT / "experiments/smoke.yaml", [
        "datagen.teacher.kind=openai", "datagen.teacher.base_url=http://u:sk-canary-2@127.0.0.1:9/v1",
        "datagen.teacher.model=${oc.env:PERSONAFUSE_TEST_SECRET}"])
    assert cfg.datagen.teacher.model == secret and "sk-canary-2" in cfg.datagen.teacher.base_url  # the run uses them
    written = to_yaml(cfg) + repr(redact_params(flatten(to_container(cfg)))) + repr(redact({"tag": f"m={secret}"}))
    assert secret not in written and "sk-canary-2" not in written
    assert "base_url: http://***@127.0.0.1:9/v1" in to_yaml(cfg)


def test_print_config_and_error_lines_carry_no_credential(tmp_path):
    url = "datagen.teacher.base_url=http://u:sk-canary-3@127.0.0.1:9/v1"
    base = [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"), url]
    shown = subprocess.run([*base, "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    failed = subprocess.run([*base, "trainer.max_steps=0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    typo = subprocess.run([*base[:-1], url.replace("base_url", "base_urll")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # the error line quotes the override
    assert shown.returncode == 0 and "http://***@127.0.0.1:9/v1" in shown.stdout
    assert failed.returncode == 2 and typo.returncode == 2 and "base_urll=http://***@127.0.0.1" in typo.stderr
    for proc in (shown, failed, typo):
        assert "sk-canary-3" not in proc.stdout + proc.stderr
