"""Credentials never reach a file or a log: every text the suite writes about its config goes through `redact`.

Three kinds of secret are masked as `***`:
- URL userinfo (`http://user:sk-...@host` -> `http://***@host`): endpoints are configured as URLs, and
  some services take the key there;
- secret-looking query parameters (`?api_key=...`, `&token=...`, `sig=...`);
- values that came from the environment through `${oc.env:VAR}`: the config layer names them with
  `remember_secret` as it resolves the config. Like a CI log mask, this is process-wide, because the
  same value can reappear anywhere (a tag, an error message), not only under the key that held it.
The run itself still uses the real values (the HTTP teacher needs its URL); only what is written is masked.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "pwd", "auth", "credential", "signature", "sig")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"?#]+@")
_QUERY = re.compile(r"(?P<name>[?&;][^=&#\s'\"?]*?(?:" + "|".join(SECRET_WORDS) + r")[^=&#\s'\"]*=)[^&#\s'\"]+", re.I)
MIN_SECRET_LENGTH = 4
"""Shorter environment values (a flag such as `1`) are not masked: masking them would garble every text."""
_known: set[str] = set()


def remember_secret(value: Any) -> None:
    """Mask this value (one that came from the environment) in everything redacted from now on."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH:
        _known.add(value)


def strip_credentials(text: str) -> str:
    """URL userinfo and secret query values masked; what a URL points at is kept."""
    return _QUERY.sub(r"\g<name>" + MASK, _USERINFO.sub(r"\g<scheme>" + MASK + "@", text))


def redact(value: Any) -> Any:
    """A text, or every string inside a dict / list, with credentials and remembered secrets masked."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if not isinstance(value, str):
        return value
    text = strip_credentials(value)
    for secret in sorted(_known, key=len, reverse=True):  # longest first: one secret may contain another
        text = text.replace(secret, MASK)
    return text


def is_secret_key(key: str) -> bool:
    """A config/param key whose value is a secret by its name (`..._env` names a variable, not a value)."""
    leaf = key.rsplit(".", 1)[-1].lower()
    return any(word in leaf for word in SECRET_WORDS[:4]) and not leaf.endswith("_env")
