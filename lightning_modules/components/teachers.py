"""Teacher LLMs that write persona data, and the strict readers and quality filters for what they write.

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
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

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
        return f"local:{self.name}"

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
        return f"openai:{self.model}@{public_url(self.base_url.rstrip('/'))}"

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

        key = os.environ.get(self.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        semaphore = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_s, limits=limits) as client:
            jobs = [
                self._one(client, semaphore, self._payload(conv, max_new_tokens, temperature, derive_seed(seed, i)), key)
                for i, conv in enumerate(conversations)
            ]
            return list(await asyncio.gather(*jobs))

    def _payload(self, conv: Conversation, max_new_tokens: int, temperature: float, seed: int) -> dict:
        return {"model": self.model, "messages": conv, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}

    async def _one(self, client, semaphore: asyncio.Semaphore, payload: dict, key: str) -> Generation:
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
        return Generation("", 0, finished=False, error=reason.replace(key, "<redacted>") if key else reason)

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


def public_url(url: str) -> str:
    """scheme://host[:port]/path: no user:password@ and no query string, which may hold a key."""
    import httpx

    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}".rstrip("/")


# --------------------------------------------------------------------------- factory


def teacher_id(cfg: Any, default_model: Any) -> str:
    """The id a teacher built from cfg will have, without loading it (for hashes and records)."""
    if cfg.kind == "local":
        return f"local:{cfg.model or default_model.name_or_path}"
    return f"openai:{cfg.model}@{public_url(cfg.base_url) if cfg.base_url else None}"


def build_teacher(cfg: Any, default_model: Any, section: str = "datagen.teacher") -> LocalTeacher | OpenAITeacher:
    """A teacher from a TeacherConfig (found at `section`); a local teacher without `model` uses the base model."""
    from experiments.config import ConfigError

    if cfg.kind == "local":
        from lightning_modules.components.base_model import load_base_model

        name = cfg.model or default_model.name_or_path
        revision = default_model.revision if cfg.model is None else None
        model, tokenizer = load_base_model(name, default_model.dtype, default_model.trust_remote_code, revision)
        return LocalTeacher(model, tokenizer, name, cfg.batch_size)
    if cfg.kind == "openai":
        for key in ("base_url", "model"):
            if not getattr(cfg, key):
                raise ConfigError(f"key '{section}.{key}' is required for an openai teacher")
        return OpenAITeacher(
            cfg.base_url, cfg.model, cfg.api_key_env, cfg.max_concurrency, cfg.timeout_s, cfg.max_retries, cfg.backoff_s
        )
    raise ConfigError(f"key '{section}.kind': unknown teacher '{cfg.kind}' (local, openai)")


# --------------------------------------------------------------------------- reading teacher output


class ParseError(ValueError):
    """The teacher's answer does not follow the requested line format."""


@dataclass(frozen=True)
class Analysis:
    cues: list[str]
    ratings: dict[str, float]
    """Pole id -> activation in [0, 1] (the teacher's 0-10 rating / 10), in pole order."""


_MARKUP = re.compile(r"^[\s>*#`_-]*")  # bullets, bold and headings that small models add
_RATING = re.compile(r"^([a-z0-9_]+)\s*[*_`]*\s*[:=]\s*[*_`]*\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?[\s*_`.]*$", re.I)
_CUES = re.compile(r"^cues?\s*[*_`]*\s*:\s*(.*)$", re.I)


def parse_analysis(text: str, pole_ids: Sequence[str]) -> Analysis:
    """`CUES: a; b` then one `pole_id: N` (0-10) line per pole. Other lines are ignored; a missing,
    repeated-with-another-value or out-of-range pole, or no cues, raises ParseError."""
    cues: Optional[list[str]] = None
    ratings: dict[str, float] = {}
    known = {p.lower(): p for p in pole_ids}
    for raw in text.splitlines():
        line = _MARKUP.sub("", raw).strip()
        cue_match = _CUES.match(line)
        if cue_match and cues is None:
            cues = [c.strip(" .*") for c in re.split(r"[;\n]", cue_match.group(1)) if c.strip(" .*")]
            continue
        rating = _RATING.match(line)
        if rating and rating.group(1).lower() in known:
            _add_rating(ratings, known[rating.group(1).lower()], float(rating.group(2)))
    if not cues:
        raise ParseError("no 'CUES:' line with at least one cue")
    missing = [p for p in pole_ids if p not in ratings]
    if missing:
        raise ParseError(f"no rating for pole(s) {', '.join(missing)}")
    return Analysis(cues, {p: ratings[p] / 10.0 for p in pole_ids})


def _add_rating(ratings: dict[str, float], pole: str, value: float) -> None:
    if not 0 <= value <= 10:
        raise ParseError(f"rating {value:g} for '{pole}' is outside 0-10")
    if pole in ratings and ratings[pole] != value:
        raise ParseError(f"pole '{pole}' rated twice ({ratings[pole]:g} and {value:g})")
    ratings[pole] = value


def parse_verdict(text: str) -> bool:
    """A judge's YES or NO, as the first word; anything else raises ParseError."""
    match = re.match(r"^\W*(yes|no)\b", text.strip(), re.I)
    if not match:
        raise ParseError(f"expected YES or NO, got {text.strip()[:40]!r}")
    return match.group(1).lower() == "yes"


_LEAD_LABEL = re.compile(r"^\s*(assistant|response|reply|answer)\s*:\s*", re.I)
_TURN_MARKERS = re.compile(r"<\|im_(?:start|end)\|>|\n\s*(?:user|human|assistant)\s*:", re.I)


def clean_response(text: str, finished: bool = True) -> str:
    """The reply alone: no leading 'Assistant:' label, nothing after a new turn starts.

    A reply cut off by the token budget is trimmed to its last full sentence, when it has one,
    so training targets do not teach the experts to stop mid-sentence.
    """
    text = _TURN_MARKERS.split(text, maxsplit=1)[0]
    text = _LEAD_LABEL.sub("", text).strip()
    if not finished:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        if ends:
            text = text[: ends[-1]]
    return text.strip()


# --------------------------------------------------------------------------- quality filters

_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just let me
    more most my myself no nor not now of off on once only or other our ours ourselves out over own
    really same she should so some such than that the their theirs them themselves then there these they
    this those through to too under until up very was we were what when where which while who whom why
    will with would you your yours yourself yourselves im ive youre dont cant thats its get got make
    like know think want need feel going one thing things something anything way well still even much
    many lot sure yes okay hi hello hey thanks thank please""".split()
)

# Stock phrases of replies that could answer any message (used with "no shared content word").
_GENERIC = re.compile(
    r"how (can|may) i (help|assist)|as an ai\b|i('m| am) (just )?an? (ai|language model)|"
    r"i (can(no|')t|am unable to) (help|assist)|thank(s| you) for (your|the) (message|question)|"
    r"i('m| am) here (to help|for you)|let me know if|feel free to|i understand( how you feel)?\b",
    re.I,
)

UNSAFE_PATTERNS: dict[str, re.Pattern] = {
    # Deliberately simple and documented in the dataset card: it catches blatant failures of a
    # teacher (encouraging self-harm, abuse, weapons), not subtle harm. Use the judge for more.
    "self_harm_encouragement": re.compile(
        r"\b(you should|go|just) (kill|hurt|harm) yourself\b|\bkys\b|no one would miss you|"
        r"\byou('d| would) be better off dead\b|\byou should (just )?(end|take) your (own )?life\b",
        re.I,
    ),
    "abuse": re.compile(r"\byou('re| are) (worthless|pathetic|a waste of (space|air)|subhuman)\b", re.I),
    "weapons": re.compile(r"\bhow to (make|build) (a |an )?(bomb|explosive|pipe bomb|nerve agent)", re.I),
    "medical_harm": re.compile(r"(?<!n't )(?<!not )\bstop taking (all )?(your|the) (medication|meds|insulin)\b", re.I),
}


def words(text: str) -> list[str]:
    """Lower-case word tokens (letters, digits, apostrophes)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def _stem(word: str) -> str:
    # Crude suffix stripping so "worried"/"worry" and "deadlines"/"deadline" count as overlap.
    for suffix in ("ing", "ied", "ies", "ed", "es", "ly", "s", "y"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    """Stemmed words of 3+ letters that are not stopwords."""
    out = set()
    for w in words(text):
        w = w.replace("'", "")
        if len(w) >= 3 and w not in _STOPWORDS and not w.isdigit():
            out.add(_stem(w))
    return out


def jaccard(a: str, b: str) -> float:
    """Token-set Jaccard similarity of two texts (1.0 for two empty texts)."""
    sa, sb = set(words(a)), set(words(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def length_flag(text: str, min_words: int, max_words: int) -> Optional[str]:
    n = len(text.split())
    if n == 0:
        return "empty"
    if n < min_words:
        return "too_short"
    if n > max_words:
        return "too_long"
    return None


def is_generic(response: str) -> bool:
    """A stock phrase, or fewer than 5 content words: a reply that could answer anything."""
    return bool(_GENERIC.search(response)) or len(content_words(response)) < 5


def ignores_user(response: str, user_text: str) -> bool:
    """No content word shared with what the user said, and generic."""
    return not (content_words(response) & content_words(user_text)) and is_generic(response)


def unsafe_category(text: str) -> Optional[str]:
    """The first UNSAFE_PATTERNS category that matches, or None."""
    return next((name for name, pattern in UNSAFE_PATTERNS.items() if pattern.search(text)), None)


def is_incoherent(text: str) -> bool:
    """Not English prose: almost no function words (word salad) or one phrase looping.

    Fluent English is ~40% function words; a random or broken model's output is well under 15%.
    Texts under 8 words are left to the length filter.
    """
    tokens = words(text)
    if len(tokens) < 8:
        return False
    function_share = sum(t.replace("'", "") in _STOPWORDS for t in tokens) / len(tokens)
    looping = len(tokens) >= 20 and len(set(tokens)) / len(tokens) < 0.3
    return function_share < 0.15 or looping


def response_flags(text: str, user_text: str, min_words: int, max_words: int) -> list[str]:
    """Rejection reasons of one response on its own: empty/too_short/too_long, incoherent, ignores_user, unsafe."""
    size = length_flag(text, min_words, max_words)
    if size == "empty":
        return [size]
    flags = [size] if size else []
    if is_incoherent(text):
        flags.append("incoherent")
    if ignores_user(text, user_text):
        flags.append("ignores_user")
    if unsafe_category(text):
        flags.append("unsafe")
    return flags


def near_duplicates(responses: dict[str, str], threshold: float) -> set[str]:
    """Keys of non-empty responses whose token-set Jaccard with another is >= threshold (both of a pair)."""
    keys = [k for k, v in responses.items() if v.strip()]
    dup: set[str] = set()
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if jaccard(responses[a], responses[b]) >= threshold:
                dup.update((a, b))
    return dup
