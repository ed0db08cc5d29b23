"""The eval stage's settings and the definitions of the numbers it reports.

EvalConfig is what `./launch.sh eval MODEL key=value ...` parses (and docs/configuration.md's config
reference documents); DEFINITIONS is written next to every metric, in eval.json and in the
printed table. Both are read by the decoding, quality and report modules, so they live apart
from all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hamburger.configio import Choice, check_range
from hamburger.dtypes import DType
from trainer.train.config import MLflowConfig

DEFINITIONS = {
    "regime": "speed runs decode exactly max_new_tokens per prompt (EOS does not stop them, as in fixed-length "
    "speed benchmarks), so both models decode the same number of tokens; quality metrics read each output cut "
    "at its first EOS, which is what stopping there would give (decoding is greedy)",
    "tokens_per_macro_step": "generated tokens / base forward passes, prefill counted as one (summed over prompts)",
    "kv_entries_per_token": "base KV entries added after the prompt / generated tokens (summed over prompts)",
    "tokens_per_s": "generated tokens / wall-clock seconds of decoding all prompts, prefill included",
    "speedup": "HAMburger tokens_per_s / base tokens_per_s, same prompts, batch size and hardware",
    "ttft_s": "mean wall-clock seconds until the first token of a batch (decoding with max_new_tokens=1)",
    "agreement_exact": "share of prompts whose generated tokens equal the base model's greedy output",
    "agreement_prefix": "mean share of the base output reproduced before the first differing token",
    "pass_at_1": "share of code prompts whose generated function passes the task's tests (subprocess, timeout)",
    "exact_match": "share of prompts with an `answer` whose normalised answer appears in the output",
    "heldout_ce": "cross-entropy (nats/token) of the held-out reference responses, teacher-forced",
    "base_nll": "the base model's mean negative log-likelihood (nats/token) of the run's outputs (each cut at "
    "its first EOS), teacher-forced after its prompt: how natural the base finds them; summed over all output "
    "tokens of all prompts / their count. The base's own greedy outputs give the reference value",
    "micro_calls_per_macro_step": "m: micro-decoder calls / macro steps while decoding, summed over batches; "
    "a batch's micro loop runs until the step's longest segment ends, so at batch 1 m = tau - 1",
    "step_costs": "t_base_s, t_embed_s, t_micro_s: seconds of one base step, one embedder call, one micro step "
    "(a one-token step) at this batch size on this hardware, measured on the static decoders' steps (graphed "
    "when decode=graphed; eager decoding adds Python overhead on top of them); t_hamburger_step_s: HAMburger's "
    "macro base step (embedder + base step + first token)",
    "bound": "tau * t_base / (t_base + t_embed + m * t_micro), tau = the run's tokens_per_macro_step, m = its "
    "micro_calls_per_macro_step: the speed-up these step costs allow at most",
    "speedup_over_bound": "speedup / bound: the share of the attainable speed-up the decoder achieved",
}


class DecodeMode(Choice):
    eager = "eager"
    static = "static"
    graphed = "graphed"


@dataclass
class EvalConfig:
    model: str = ""
    """Export folder, models:/NAME/VERSION, or a training run / checkpoint folder."""
    base: str = ""
    """Base model to compare with (default: the one the model was trained from)."""
    data: str = ""
    """A prep folder (its held-out split; default: the model's training data) or a .jsonl of
    {"prompt", optional "answer", "test", "entry_point"} records."""
    split: str = "eval"
    """Split of a prep folder to take prompts from."""
    max_prompts: int = 32
    """How many prompts to decode."""
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    """Decode batch sizes to measure (each with the base and every confidence)."""
    max_new_tokens: int = 128
    """Tokens decoded per prompt in the speed runs (fixed length)."""
    confidences: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    """Confidence levels c: a segment ends once P(continue) < c."""
    code_timeout_s: float = 10.0
    """Time limit of one pass@1 test run."""
    decode: DecodeMode = DecodeMode.eager
    """Decoder for both models: eager, static (static KV caches, no host sync but the stop
    decisions) or graphed (static + CUDA graphs on a GPU; static on CPU). Same tokens."""
    batch_aware: bool = False
    """batch > 1: the micro loop ends the segments of the few rows still in theirs when one
    more micro step costs more than it yields (static/graphed: cutoff t_micro / t_macro,
    measured per batch size; eager: both costs per row count, measured as it decodes); off:
    every micro step runs while any row continues."""
    max_segment_len_by_batch: dict[int, int] = field(default_factory=dict)
    """At these batch sizes, segments of at most this many tokens (a K below
    the model's for large batches, e.g. {32: 2}); other batch sizes use the model's K."""
    dtype: DType = DType.auto
    """auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16; both models use it."""
    output_dir: str = "outputs/eval"
    """Where eval.json, the plot and the default MLflow store go."""
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model: give an export folder, models:/NAME/VERSION or a run folder")
        if not self.confidences or any(not 0 < c <= 1 for c in self.confidences):
            raise ValueError(f"confidences must lie in (0, 1], got {self.confidences}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be >= 1, got {self.batch_sizes}")
        check_range("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1")
        check_range("max_prompts", self.max_prompts, self.max_prompts >= 1, ">= 1")
        check_range("code_timeout_s", self.code_timeout_s, self.code_timeout_s > 0, "> 0")
        for bs, k in self.max_segment_len_by_batch.items():
            if k < 1:
                raise ValueError(f"max_segment_len_by_batch: {bs}: {k} must be >= 1")
