"""Quality metrics of the decoded outputs: agreement with the base, pass@1, exact match, NLLs.

pass@1 runs model-written code, so the sandboxed subprocess lives here with the metrics that
need it; heldout_ce and base_nll are the teacher-forced measures (HAMburger and base on the
reference responses, the base on each run's outputs).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from hamburger.model import HAMburgerModel, Sample, collate
from trainer.evaluate.prompts import Prompt


def extract_code(text: str) -> str:
    blocks = re.findall(r"```(?:python)?\n(.*?)(?:```|$)", text, flags=re.S)
    return blocks[0] if blocks else text


def passes_tests(code: str, test: str, entry_point: str, timeout_s: float) -> bool:
    """Run model-written code and the task's tests: this executes untrusted code, so it runs in
    a fresh isolated interpreter (-I), in a throw-away temporary folder that is its working and
    home directory, with an empty environment, a CPU-time and memory limit, and a wall-clock
    timeout after which its whole process group is killed (children included)."""
    program = f"{code}\n\n{test}\n\ncheck({entry_point})\n"
    with tempfile.TemporaryDirectory(prefix="hamburger-pass1-") as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": tmp,
            "TMPDIR": tmp,
            "no_proxy": "*",
            "NO_PROXY": "*",
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _limit_resources(timeout_s),
        )
        try:
            return proc.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever it started dies with it
            except ProcessLookupError:
                pass
            proc.wait()


def _limit_resources(timeout_s: float) -> None:
    """In the child before exec: CPU seconds and address space (4 GiB) are capped."""
    import resource

    cpu = int(timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The output up to and including its first EOS."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def quality(
    prompts: list[Prompt],
    texts: list[str],
    tokens: list[list[int]],
    base_tokens: list[list[int]],
    timeout_s: float,
) -> dict[str, float]:
    q: dict[str, float] = {}
    exact = [a == b for a, b in zip(tokens, base_tokens, strict=True)]
    q["agreement_exact"] = sum(exact) / len(exact)
    prefix = []
    for a, b in zip(tokens, base_tokens, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(b), 1))
    q["agreement_prefix"] = sum(prefix) / len(prefix)
    code = [
        (p, t) for p, t in zip(prompts, texts, strict=True) if "test" in p.meta and "entry_point" in p.meta
    ]
    if code:
        ok = [
            passes_tests(extract_code(t), p.meta["test"], p.meta["entry_point"], timeout_s) for p, t in code
        ]
        q["pass_at_1"] = sum(ok) / len(ok)
    answers = [(p, t) for p, t in zip(prompts, texts, strict=True) if "answer" in p.meta]
    if answers:
        q["exact_match"] = sum(normalise(str(p.meta["answer"])) in normalise(t) for p, t in answers) / len(
            answers
        )
    return q


@torch.no_grad()
def heldout_ce(model: HAMburgerModel, base, prompts: list[Prompt]) -> dict[str, float]:
    labelled = [p for p in prompts if p.reference and p.seg_lens]
    if not labelled:
        return {}
    ham_sum = base_sum = n = 0.0
    for p in labelled:
        s = Sample(p.ids + p.reference, len(p.ids), p.seg_lens)
        device = next(base.parameters()).device
        ham = model(collate([s], model.config.max_segment_len).to(device)).ce.item()
        logits = base(input_ids=torch.tensor([s.input_ids], device=device)).logits[0, len(p.ids) - 1 : -1]
        b = F.cross_entropy(logits.float(), torch.tensor(p.reference, device=device)).item()
        k = len(p.reference)
        ham_sum, base_sum, n = ham_sum + ham * k, base_sum + b * k, n + k
    return {"hamburger": ham_sum / n, "base": base_sum / n, "tokens": n}


@torch.no_grad()
def base_nll(base, prompts: list[list[int]], outputs: list[list[int]], batch_size: int = 8) -> float:
    """The base model's mean NLL (nats/token) of each output after its prompt, teacher-forced:
    batches of right-padded prompt+output rows (masked), the LM head applied only where an
    output token is predicted."""
    device = next(base.parameters()).device
    head = base.get_output_embeddings()
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        rows = [p + o for p, o in zip(prompts[i : i + batch_size], outputs[i : i + batch_size], strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
        pos = torch.arange(width)[None]
        starts = torch.tensor([len(p) for p in prompts[i : i + batch_size]])[:, None]
        ends = torch.tensor([len(r) for r in rows])[:, None]
        ids, mask = ids.to(device), (pos < ends).long().to(device)
        predicts = ((pos >= starts - 1) & (pos < ends - 1)).to(device)  # position q predicts token q + 1
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = ids[:, 1:][predicts[:, :-1]]
        logits = head(hidden[:, :-1][predicts[:, :-1]])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 kept
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    return total / max(count, 1)
