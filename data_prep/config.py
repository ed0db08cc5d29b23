"""Typed configuration of a data-prep run (YAML + key=value overrides; see hamburger.configio)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from hamburger.choice import Choice
from hamburger.dtypes import DType

from .strategies import STRATEGIES

METRICS = ("entropy", "prob")


class Strategy(Choice):
    decreasing_v2 = "decreasing_v2"
    decreasing = "decreasing"
    sliding = "sliding"
    small_group = "small_group"
    fixed = "fixed"


class Metric(Choice):
    entropy = "entropy"
    prob = "prob"


class Format(Choice):
    auto = "auto"
    jsonl = "jsonl"
    json = "json"
    parquet = "parquet"
    csv = "csv"
    arrow = "arrow"


class Overlong(Choice):
    skip = "skip"
    truncate = "truncate"


class BadRows(Choice):
    error = "error"
    skip = "skip"


class Responses(Choice):
    source = "source"
    regenerate = "regenerate"


class AtLimit(Choice):
    keep = "keep"
    skip = "skip"


@dataclass
class FilterConfig:
    """Keep a row only if its `field` passes every check given (declarative; no code strings)."""

    field: str = ""
    """The row field the checks read."""
    equals: str | None = None
    """Keep rows whose field equals this."""
    not_equals: str | None = None
    """Drop rows whose field equals this."""
    min_chars: int | None = None
    """Keep rows whose field has at least this many characters."""
    max_chars: int | None = None
    """Keep rows whose field has at most this many characters."""

    def validate(self, where: str) -> None:
        if not self.field:
            raise ValueError(f"{where}.field must name the row field the filter reads")
        checks = (self.equals, self.not_equals, self.min_chars, self.max_chars)
        if all(c is None for c in checks):
            raise ValueError(f"{where}: set at least one of equals, not_equals, min_chars, max_chars")
        for name in ("min_chars", "max_chars"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{where}.{name} must be >= 0, got {value}")


@dataclass
class SourceConfig:
    """One corpus and how its rows become (prompt messages, response)."""

    path: str = ""
    """Local file, glob or folder (.jsonl/.json/.parquet/.csv/.arrow), or builtin:chatterbot,
    builtin:humaneval, builtin:stdlib, builtin:smollm2_distilled (SmolLM2's own responses to
    those prompts, shipped). Leave empty and set hf_name for a Hugging Face dataset."""
    hf_name: str = ""
    """Hugging Face dataset name, loaded with datasets.load_dataset (needs the hub)."""
    hf_config: str | None = None
    """Hugging Face dataset configuration name."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    name: str = ""
    """Id in shards and manifest; default derived from path / hf_name."""
    format: Format = Format.auto
    """auto (by file ending), jsonl, json, parquet, csv or arrow."""
    prompt_field: str = "instruction"
    """Field holding the user prompt."""
    input_field: str = ""
    """Optional second prompt field appended after a blank line (Alpaca's 'input')."""
    response_field: str = "output"
    """Field holding the response to learn. Empty: a prompt-only source (needs responses: regenerate)."""
    messages_field: str = ""
    """If set, rows hold a conversation: a list of OpenAI {role, content} or ShareGPT {from,
    value} turns (from: human/user, gpt/assistant/chatgpt/bard/bing/model, system)."""
    turns: str = "all"
    """For a conversation (messages_field): `all` learns every assistant turn (one row per
    turn, the turns before it as context without loss), `last` only the final one."""
    system: str | None = None
    """System message put before the prompt (None: none)."""
    weight: float = 1.0
    """Repeat (e.g. 3.0: three copies) or subsample (0.2: a deterministic fifth) this source."""
    filters: list[FilterConfig] = field(default_factory=list)
    """Keep only rows passing every filter."""


@dataclass
class LabelConfig:
    """How the base model's uncertainty becomes segment boundaries."""

    RENAMED: ClassVar[dict[str, str]] = {"max_steps": "max_segment_len"}
    """Old key -> its new name: an old config fails naming the new key."""

    strategy: Strategy = Strategy.decreasing_v2
    """decreasing_v2 (paper default), decreasing, sliding, small_group or fixed."""
    metric: Metric = Metric.entropy
    """entropy of the predictive distribution, or prob: surprisal -log p(actual token), in nats."""
    max_segment_len: int = 4
    """K: longest segment."""
    min_threshold: float = 0.05
    """decreasing_v2: a token under this value always joins."""
    ratio: float = 0.3
    """decreasing_v2 / decreasing: join if value < ratio * reference value of the segment."""
    sliding_confidence: float = 0.7
    """sliding: join while the value is under the entropy of a distribution over the vocabulary whose top token has this probability (the rest spread evenly): 4.139 nats at 0.7 for a 128k vocabulary."""
    small_group_confidence: float = 0.95
    """small_group: the same kind of threshold at this confidence (0.787 nats at 0.95, 128k vocabulary); hard tokens stand alone."""
    fixed_k: int = 2
    """fixed: every segment this long (the last may be shorter); a baseline."""
    batch_tokens: int = 8192
    """Padded tokens per scoring batch (samples are sorted by length, so padding stays small)."""
    dtype: DType = DType.auto
    """auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16."""

    def validate(self) -> None:
        for name in ("min_threshold", "ratio", "sliding_confidence", "small_group_confidence"):
            _finite(f"label.{name}", getattr(self, name))
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"label.strategy {self.strategy!r} is unknown; choose one of {sorted(STRATEGIES)}"
            )
        if self.metric not in METRICS:
            raise ValueError(f"label.metric {self.metric!r} is unknown; choose one of {list(METRICS)}")
        if not 1 <= self.max_segment_len <= 127:  # seg_lens are stored as int8
            raise ValueError(f"label.max_segment_len (K) must lie in 1..127, got {self.max_segment_len}")
        if self.min_threshold < 0:
            raise ValueError(f"label.min_threshold must be >= 0, got {self.min_threshold}")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"label.ratio must lie in [0, 1], got {self.ratio}")
        for name in ("sliding_confidence", "small_group_confidence"):
            if not 0.5 <= getattr(self, name) < 1:
                raise ValueError(f"label.{name} must lie in [0.5, 1), got {getattr(self, name)}")
        if not 1 <= self.fixed_k <= self.max_segment_len:
            raise ValueError(
                f"label.fixed_k must lie in 1..max_segment_len={self.max_segment_len}, got {self.fixed_k}"
            )
        if self.batch_tokens < 1:
            raise ValueError(f"label.batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"label.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


RESPONSES = ("source", "regenerate")
AT_LIMIT = ("keep", "skip")


@dataclass
class GenerateConfig:
    """Self-distillation (responses: regenerate): the base model writes every response before
    labelling, so fine-tuning teaches the grafted modules to reproduce the base itself. The
    model runs in label.dtype (one model writes and scores)."""

    max_new_tokens: int = 256
    """Most tokens the base writes per response; a response ends at the tokenizer's EOS."""
    temperature: float = 0.0
    """0: greedy (default). > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sampling only: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int = 0
    """Sampling only: each response samples from its own generator seeded by (seed, shard, row),
    so a resumed shard writes the same responses, whatever the batch size or decode."""
    batch_size: int = 16
    """Rows of the continuous batch: a response that ends makes room for the next prompt."""
    at_limit: AtLimit = AtLimit.keep
    """A response cut at max_new_tokens (no EOS): keep it as it is, or skip the row; counted either way."""
    decode: str = "eager"
    """eager (the continuous batch on dynamic caches), static (the slot engine: fixed shapes),
    graphed (static + CUDA graphs on a GPU: about 20x eager at batch 1 there), or auto (graphed
    on a GPU, eager elsewhere). Part of the prep key unless eager (in bf16 the kernels differ,
    so near-ties may decode differently)."""

    def validate(self) -> None:
        _finite("generate.temperature", self.temperature)
        _finite("generate.top_p", self.top_p)
        if self.max_new_tokens < 1:
            raise ValueError(f"generate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"generate.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generate.top_p must lie in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"generate.batch_size must be >= 1, got {self.batch_size}")
        if self.at_limit not in AT_LIMIT:
            raise ValueError(f"generate.at_limit must be one of {list(AT_LIMIT)}, got {self.at_limit!r}")
        modes = ("auto", "eager", "static", "graphed")
        if self.decode not in modes:
            raise ValueError(f"generate.decode must be one of {list(modes)}, got {self.decode!r}")


@dataclass
class PrepConfig:
    """A data-prep run: sources -> chat-templated tokens -> labelled shards + manifest."""

    model: str = "builtin:smollm2"
    """Base model that scores the data: hub name, local folder, or builtin:smollm2."""
    tokenizer: str = ""
    """Tokenizer (default: the model's)."""
    chat_template: str = ""
    """Empty: the tokenizer's own template. 'plain': a simple 'role: content' template for
    tokenizers without one. Any other value is used as a Jinja chat template."""
    sources: list[SourceConfig] = field(default_factory=list)
    """The corpora (see the table of source keys)."""
    max_len: int = 1024
    """Most tokens (prompt + response) per sample."""
    overlong: Overlong = Overlong.skip
    """skip (counted) or truncate the response of samples over max_len."""
    bad_rows: BadRows = BadRows.error
    """error: stop at the first malformed row, naming file, row and field; skip: count and go on."""
    heldout_fraction: float = 0.05
    """Share of rows (chosen by a hash of source and row) kept for evaluation; in (0, 1)."""
    seed: int = 0
    """Seed of the held-out split, subsampling and shard mixing."""
    shard_rows: int = 256
    """Rows per shard: the unit of work split across ranks and of resume."""
    keep_values: bool = False
    """Also store every response token's metric value (float16) in the shards."""
    output_root: str = "outputs/prep"
    """Shards go to output_root/<cache key>; a re-run with the same key reuses them."""
    label: LabelConfig = field(default_factory=LabelConfig)
    responses: Responses = Responses.source
    """source: learn the sources' responses. regenerate: the base model writes them first
    (self-distillation, settings under generate); prompt-only sources need this."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("sources: at least one source is needed")
        if self.responses not in RESPONSES:
            raise ValueError(f"responses must be one of {list(RESPONSES)}, got {self.responses!r}")
        names: dict[str, int] = {}
        for i, s in enumerate(self.sources):
            _validate_source(s, f"sources.{i}", prompt_only_ok=self.responses == "regenerate")
            name = source_name(s)
            if name in names:
                raise ValueError(
                    f"sources.{i}: name {name!r} is also sources.{names[name]}'s; set a distinct name"
                )
            names[name] = i
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.responses == "regenerate" and self.generate.max_new_tokens >= self.max_len:
            raise ValueError(
                f"generate.max_new_tokens ({self.generate.max_new_tokens}) cannot fit in max_len "
                f"({self.max_len}): a row is its prompt + response within max_len; lower "
                "generate.max_new_tokens or raise max_len"
            )
        if self.overlong not in ("skip", "truncate"):
            raise ValueError(f"overlong must be skip or truncate, got {self.overlong!r}")
        if self.bad_rows not in ("error", "skip"):
            raise ValueError(f"bad_rows must be error or skip, got {self.bad_rows!r}")
        _finite("heldout_fraction", self.heldout_fraction)
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(
                f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}: training evaluates "
                "on the held-out split, so some rows must be held out"
            )
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")
        if not self.output_root:
            raise ValueError("output_root must name a folder")
        self.label.validate()
        self.generate.validate()


def _finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value}")


def _validate_source(s: SourceConfig, where: str, prompt_only_ok: bool) -> None:
    if bool(s.path) == bool(s.hf_name):
        raise ValueError(f"{where}: set exactly one of path or hf_name")
    _finite(f"{where}.weight", s.weight)
    if s.weight <= 0:
        raise ValueError(f"{where}.weight must be > 0, got {s.weight}")
    if s.format not in ("auto", "jsonl", "json", "parquet", "csv", "arrow"):
        raise ValueError(f"{where}.format {s.format!r} is unknown")
    if s.turns not in ("all", "last"):
        raise ValueError(f"{where}.turns must be all or last, got {s.turns!r}")
    if not s.messages_field:
        if not s.prompt_field:
            raise ValueError(f"{where}.prompt_field must name a field (or set messages_field)")
        if not s.response_field and not prompt_only_ok and not s.path.startswith("builtin:"):
            raise ValueError(
                f"{where}.response_field is empty: a prompt-only source has no response to learn; "
                "set responses: regenerate to have the base model write them (or name the field)"
            )
    for j, f in enumerate(s.filters):
        f.validate(f"{where}.filters.{j}")


def source_name(cfg: SourceConfig) -> str:
    """The source's id in shards and manifest: its name, else derived from hf_name or path."""
    if cfg.name:
        return cfg.name
    if cfg.hf_name:
        return cfg.hf_name.replace("/", "__")
    if cfg.path.startswith("builtin:"):
        return cfg.path.split(":", 1)[1]
    return Path(cfg.path.rstrip("/*")).stem or "source"
