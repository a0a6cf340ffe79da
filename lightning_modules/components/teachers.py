"""Teacher LLMs that write persona data (what they write is read and checked in `quality_filters`).

Two backends share one call, `generate(conversations, max_new_tokens, temperature, seed)`, which
returns one `Generation` per conversation and never raises for a single failed item:
- `LocalTeacher`: a transformers causal LM (chat template, left padding, batched generation).
- `OpenAITeacher`: any OpenAI-compatible /v1/chat/completions endpoint (vLLM, TGI, a hosted API).
Plain classes, no Lightning: the datagen stage drives them from its predict loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from datamodules.io import ConfigError
from datamodules.redaction import redact

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    """Generated (completion) tokens."""
    finished: bool = True
    """False when the token budget cut the answer off."""
    error: Optional[str] = None
    """Why no text came back (the HTTP teacher after its retries); None on success."""


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts, e.g. (seed, batch index, step, attempt): stable across runs and machines."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# --------------------------------------------------------------------------- local


class LocalTeacher:
    """A transformers causal LM. Output is a function of (conversations, seed, batch_size) only."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # Left padding: every prompt ends where generation starts, so one batch decodes in lockstep.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = name
        self.batch_size = batch_size

    @property
    def id(self) -> str:
        return _public_id("local", self.name, None)

    def generate(
        self, conversations: Sequence[Conversation], max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> list[Generation]:
        out: list[Generation] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = list(conversations[start : start + self.batch_size])
            out += self._generate_chunk(chunk, max_new_tokens, temperature, derive_seed(seed, start))
        return out

    @torch.no_grad()
    def _generate_chunk(self, chunk: list[Conversation], max_new_tokens: int, temperature: float, seed: int):
        device = next(self.model.parameters()).device
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
        # The chat template already holds the special tokens; adding a BOS again would shift the prompt.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
        # fork_rng: seeding here must not move the caller's global RNG.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling
            )
        return [self._decode(row) for row in out[:, enc["input_ids"].shape[1] :].tolist()]

    def _decode(self, ids: list[int]) -> Generation:
        stops = self._stop_ids()
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        kept = ids if end is None else ids[: end + 1]
        return Generation(self.tokenizer.decode(kept, skip_special_tokens=True), len(kept), finished=end is not None)

    def _stop_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return {i for i in ids if i is not None}


# --------------------------------------------------------------------------- OpenAI-compatible


@dataclass(frozen=True)
class _Failure:
    reason: str
    retryable: bool
    retry_after: Optional[float] = None


class OpenAITeacher:
    """Any /v1/chat/completions endpoint, with bounded concurrency, timeouts, retries and backoff.

    The API key is read from the environment variable `api_key_env` at every call and only ever
    placed in the request header: it is not stored on the object, and error texts are scrubbed of it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, max_concurrency)
        self.timeout_s = timeout_s
        self.max_retries = max(0, max_retries)
        self.backoff_s = backoff_s

    @property
    def id(self) -> str:
        return _public_id("openai", self.model, self.base_url.rstrip("/"))

    def generate(
        self, conversations: Sequence[Conversation], max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> list[Generation]:
        coro = self._generate_all(list(conversations), max_new_tokens, temperature, seed)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Called from inside an event loop (a notebook): run ours on a worker thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    async def _generate_all(self, conversations, max_new_tokens, temperature, seed) -> list[Generation]:
        import httpx

        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # What a careless server may echo back into an error text: the key, and the Basic
        # credentials httpx derives from user:password@ in the URL (it sends those instead of the key).
        secrets = [s for s in (key, _basic_credentials(self.base_url)) if s]
        semaphore = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_s, limits=limits) as client:
            jobs = [
                self._one(client, semaphore, self._payload(conv, max_new_tokens, temperature, derive_seed(seed, i)), secrets)
                for i, conv in enumerate(conversations)
            ]
            return list(await asyncio.gather(*jobs))

    def _payload(self, conv: Conversation, max_new_tokens: int, temperature: float, seed: int) -> dict:
        return {"model": self.model, "messages": conv, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}

    async def _one(self, client, semaphore: asyncio.Semaphore, payload: dict, secrets: list[str]) -> Generation:
        """One item: retry what may pass on a retry, then report why it failed instead of raising."""
        failure = _Failure("not attempted", False)
        for attempt in range(self.max_retries + 1):
            async with semaphore:  # released while backing off, so other items keep the slots busy
                outcome = await self._attempt(client, payload)
            if isinstance(outcome, Generation):
                return outcome
            failure = outcome
            if not failure.retryable or attempt == self.max_retries:
                break
            delay = self.backoff_s * 2**attempt
            await asyncio.sleep(max(delay, min(failure.retry_after or 0.0, 60.0)))
        reason = f"{failure.reason} (after {attempt + 1} attempt(s))"
        for secret in secrets:
            reason = reason.replace(secret, "<redacted>")
        return Generation("", 0, finished=False, error=redact(reason))

    async def _attempt(self, client, payload: dict) -> Generation | _Failure:
        import httpx

        try:
            # httpx's timeout bounds each read; wait_for bounds the whole request (a trickling server).
            resp = await asyncio.wait_for(client.post("chat/completions", json=payload), self.timeout_s)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            return _Failure(f"timeout after {self.timeout_s:g}s", True)
        except httpx.TransportError as err:
            return _Failure(f"connection error ({type(err).__name__})", True)
        if resp.status_code in (408, 429) or resp.status_code >= 500:
            return _Failure(f"HTTP {resp.status_code}", True, _retry_after(resp.headers.get("retry-after")))
        if resp.status_code >= 400:
            return _Failure(f"HTTP {resp.status_code}: {resp.text[:200]}", False)
        return _read_completion(resp)


def _read_completion(resp) -> Generation | _Failure:
    """The first choice's text and token count; a body that is not a completion is retried."""
    try:
        data = resp.json()
        choice = data["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("message.content is not a string")
    except (ValueError, KeyError, IndexError, TypeError) as err:
        return _Failure(f"malformed response ({type(err).__name__})", True)
    usage = data.get("usage") or {}
    # Servers that omit usage: count words, so tokens/s stays roughly meaningful.
    tokens = usage.get("completion_tokens") or len(text.split())
    return Generation(text, int(tokens), finished=choice.get("finish_reason") != "length")


def _retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _basic_credentials(url: str) -> str:
    """The base64 token of a URL's user:password, as an Authorization: Basic header carries it."""
    import base64

    import httpx

    parsed = httpx.URL(url)
    if not (parsed.username or parsed.password):
        return ""
    return base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()


def public_url(url: str) -> str:
    """scheme://host[:port]/path: no user:password@ and no query string, which may hold a key."""
    import httpx

    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}".rstrip("/")


def _public_id(kind: str, model: str, url: Optional[str]) -> str:
    """kind:model[@endpoint], as written into records, cards and tags: no credentials, and no value
    that came from the environment (redact)."""
    return redact(f"{kind}:{model}" + (f"@{public_url(url)}" if url else ""))


# --------------------------------------------------------------------------- factory


def teacher_id(cfg: Any, default_model: Any) -> str:
    """The id a teacher built from cfg will have, without loading it (for hashes and records):
    kind:model, plus @endpoint for a teacher reached over HTTP."""
    if cfg.base_url:  # a served model: the endpoint (without credentials) is part of its identity
        return _public_id(cfg.kind, cfg.model, cfg.base_url)
    return _public_id(cfg.kind, cfg.model or default_model.name_or_path, None)


def build_teacher(cfg: Any, default_model: Any, section: str = "datagen.teacher"):
    """A teacher from a TeacherConfig (found at `section`), built by its registered builder."""
    from lightning_modules.components.registries import TEACHERS

    if cfg.kind not in TEACHERS:
        raise ConfigError(f"key '{section}.kind': {TEACHERS.unknown_message(cfg.kind)}")
    return TEACHERS.get(cfg.kind)(cfg, default_model, section)


def build_local_teacher(cfg: Any, default_model: Any, section: str) -> LocalTeacher:
    """A local transformers teacher; without `model` it uses the base model (at its revision)."""
    from lightning_modules.components.base_model import load_base_model, load_configured

    if cfg.model is None:
        model, tokenizer = load_configured(default_model)
    else:
        model, tokenizer = load_base_model(cfg.model, default_model.dtype, default_model.trust_remote_code)
    return LocalTeacher(model, tokenizer, cfg.model or default_model.name_or_path, cfg.batch_size)


def build_openai_teacher(cfg: Any, default_model: Any, section: str) -> OpenAITeacher:
    for key in ("base_url", "model"):
        if not getattr(cfg, key):
            raise ConfigError(f"key '{section}.{key}' is required for an openai teacher")
    return OpenAITeacher(
        cfg.base_url, cfg.model, cfg.api_key_env, cfg.max_concurrency, cfg.timeout_s, cfg.max_retries, cfg.backoff_s
    )
