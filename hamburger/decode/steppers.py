"""How one macro step works, for a plain causal LM and for HAMburger: prefill the left-padded
prompts, choose every row's next segment, feed the segments back as one new KV column. The
offline batched decoder (batched_decode) and the serving batcher (hamburger/decode/continuous.py) both
drive these, so their decisions are the same by construction.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from hamburger.decode.growing_cache import GrowingCache
from hamburger.decode.sampling import next_tokens
from hamburger.model.compat import cache_kwargs


class BaseStepper:
    """A plain causal LM: the 'segment' is the next token; state = last-position logits."""

    kind = "base"

    def __init__(self, lm: torch.nn.Module):
        self.lm = self.parameters_of = lm.eval()
        self.config = lm.config
        self.max_segment_len = 1

    def new_cache(self) -> GrowingCache:
        return GrowingCache(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters_of.parameters()).device

    def prefill(self, ids, mask, positions, cache) -> torch.Tensor:
        kw = cache_kwargs(self.lm, cache)
        out = self.lm(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kw
        )
        return out.logits[:, -1]

    def segments(self, state, budgets, confidences, eos, rows=None, rule=None):
        """rows: the batch's Sequences, whose sampling settings pick their tokens (None: greedy).
        rule: HAMburger's batch-aware micro loop; a base has none."""
        toks = state.argmax(-1).tolist() if rows is None else next_tokens(state, rows)
        return [[t] for t in toks], [False] * len(toks)

    def advance(self, segs, mask, positions, cache, rule=None) -> torch.Tensor:
        ids = torch.tensor([s[-1] for s in segs], device=mask.device)[:, None]
        kw = cache_kwargs(self.lm, cache)
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kw)
        return out.logits[:, -1]


class HAMburgerStepper:
    """HAMburger: state = the feature hidden states [n, F, D] at each row's last base position."""

    kind = "hamburger"

    def __init__(self, model):
        self.model = self.parameters_of = model.eval()
        self.config = model.base.config
        self.max_segment_len = model.config.max_segment_len
        self._base = model.base.model

    def new_cache(self) -> GrowingCache:
        return GrowingCache(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters_of.parameters()).device

    def _forward(self, cache, **inputs) -> torch.Tensor:
        out = self._base(
            use_cache=True, output_hidden_states=True, **cache_kwargs(self._base, cache), **inputs
        )
        return torch.stack([h[:, -1] for h in self.model.features(out.hidden_states)], dim=1)

    def prefill(self, ids, mask, positions, cache) -> torch.Tensor:
        return self._forward(cache, input_ids=ids, attention_mask=mask, position_ids=positions)

    def advance(self, segs, mask, positions, cache, rule=None) -> torch.Tensor:
        """Smash each row's segment into one input and run the base on it (timed for `rule`)."""
        k, device = self.max_segment_len, mask.device
        timer = rule.timer() if rule is not None else None
        lens = torch.tensor([len(s) for s in segs], device=device)
        seg_t = torch.tensor([s + [0] * (k - len(s)) for s in segs], device=device)
        x = self.model.smash(seg_t, lens)[:, None]
        feats = self._forward(cache, inputs_embeds=x, attention_mask=mask, position_ids=positions)
        if timer is not None:
            rule.record("base", len(segs), timer.seconds())
        return feats

    def segments(
        self, feats, budgets: list[int], confidences: list[float], eos: set[int], rows=None, rule=None
    ):
        """One macro step's micro loop for every row at once, each row with its own confidence.

        Same decisions as decode._segment (one sequence): stop at EOS, at the budget, or once
        P(continue) < confidence. Returns (segments, stopped_by_head). Greedy only: a sampled
        row among `rows` (the batch's Sequences) is refused. rule (a MicroRule): the micro loop
        knows its batch, ending the segments of the few rows still going when another micro
        step would cost more than it yields (hamburger/decode/micro_rule.py)."""
        if rows is not None and any(s.temperature > 0 for s in rows):
            raise ValueError("HAMburger decodes greedily: temperature > 0 is for base models")
        model, n = self.model, feats.shape[0]
        timer = rule.timer() if rule is not None else None
        tok, stop = model.first_token(feats[:, -1])
        segs = [[t] for t in tok.tolist()]
        by_head = [False] * n

        def still_going(rows: list[int], stops: torch.Tensor) -> list[int]:
            cont = (1 - torch.sigmoid(stops.float())).tolist()
            going = []
            for row, c in zip(rows, cont, strict=True):
                if segs[row][-1] in eos or len(segs[row]) >= budgets[row]:
                    continue
                if c < confidences[row]:
                    by_head[row] = True
                    continue
                going.append(row)
            return going

        live = still_going(list(range(n)), stop)
        if timer is not None:
            rule.record("head", n, timer.seconds())
        cache, prev = None, []
        slots = model.micro.features_in(feats)
        while live:
            if rule is not None and not rule.goes_on(len(live), n):
                break  # their segments end here; by_head stays False for them
            timer = rule.timer() if rule is not None else None
            rows = torch.tensor(live, device=feats.device)
            last = model.embed_tokens(torch.tensor([segs[r][-1] for r in live], device=feats.device))[:, None]
            if cache is None:
                cache = DynamicCache(config=model.micro.config)
                x = torch.cat([slots[rows], last], dim=1)
            else:
                cache.batch_select_indices(torch.tensor([prev.index(r) for r in live], device=feats.device))
                x = last
            tok, stop = model.micro_step(x, cache)
            for r, t in zip(live, tok.tolist(), strict=True):
                segs[r].append(t)
            prev = live
            live = still_going(live, stop)
            if timer is not None:
                rule.record("micro", len(prev), timer.seconds())
        return segs, by_head


def left_pad(prompts: list[list[int]], pad_id: int, device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions
