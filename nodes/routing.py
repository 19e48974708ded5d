"""Which attention calls go to Sage: the block list and the step range of the patch node.

A model's "block" is counted the same way for every architecture: block i is the i-th self-attention
(or joint attention) call of one model forward, and a cross-attention call belongs to the block of the
self-attention before it. For UNets, DiTs (Wan, Flux, SD3, HunyuanVideo, LTX, Qwen-Image) this is the
transformer block index users know ("0-3, 36-39" are the first and last four blocks of Wan 14B).
"""
from __future__ import annotations

import re

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def parse_blocks(text: str) -> frozenset[int]:
    """'0-3, 36-39, 12' -> {0, 1, 2, 3, 12, 36, 37, 38, 39}; raises ValueError naming the bad part."""
    blocks = set()
    for part in (text or "").replace(";", ",").split(","):
        if not part.strip():
            continue
        m = _RANGE.match(part)
        if not m:
            raise ValueError(f"exact_blocks: {part.strip()!r} is not a block number or a range like 0-3")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"exact_blocks: range {part.strip()!r} runs backwards")
        if hi - lo > 100000:
            raise ValueError(f"exact_blocks: range {part.strip()!r} is too long")
        blocks.update(range(lo, hi + 1))
    return frozenset(blocks)


def format_blocks(blocks) -> str:
    """The inverse of parse_blocks, with runs folded: {0,1,2,3,9} -> '0-3, 9'."""
    out, run = [], []
    for b in sorted(set(blocks)):
        if run and b == run[-1] + 1:
            run.append(b)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [b]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


class ForwardCounter:
    """Counts attention calls inside one model forward (a fresh one is put in each forward's options)."""

    KEY = "sage_attention_forward"

    def __init__(self, placed: bool = True):
        self.self_calls = -1
        self.calls = -1
        self.steps_active = True  # set per forward from the sigma, against the node's step range
        # False for a call outside a sampler forward, counted on its own: its place in the forward is unknown
        self.placed = placed
        self.variant = None  # replaced_blocks of the forward's options, taken at its first call

    def next_call(self, is_self_attention: bool) -> tuple[int, int]:
        """(block index, call index within the forward) of the call being made."""
        self.calls += 1
        if is_self_attention or self.self_calls < 0:
            self.self_calls += 1
        return self.self_calls, self.calls


def replaced_blocks(transformer_options: dict) -> tuple:
    """Which parts of the model a forward's options replace (their patches_replace keys, e.g. the "dit" blocks skip
    layer guidance skips in a pass of its own): a forward with other replacements makes its calls at other places
    (its i-th call is another block's), so call sites are told apart by them."""
    replaced = transformer_options.get("patches_replace") or {}
    return tuple(sorted((str(kind), repr(key)) for kind, patches in replaced.items() if isinstance(patches, dict)
                        for key in patches))


def forward_counter(transformer_options: dict) -> ForwardCounter:
    counter = transformer_options.get(ForwardCounter.KEY)
    if counter is None:  # a call outside a sampler forward (no wrapper ran): count it on its own
        counter = ForwardCounter(placed=False)
    return counter


def sigma_in_range(sigmas, sigma_start: float, sigma_end: float) -> bool:
    """Is the current step (its sigma, a tensor or number) inside [start, end] of the schedule? Sigmas fall
    as sampling goes on."""
    if sigmas is None:
        return True
    try:
        sigma = float(sigmas.detach().flatten()[0]) if hasattr(sigmas, "detach") else float(sigmas)
    except (TypeError, ValueError, IndexError):
        return True
    return sigma_end <= sigma <= sigma_start
