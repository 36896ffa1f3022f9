"""Expected Attention (Devoto, Jeblick, Jégou, "Expected Attention: KV Cache Compression by
Estimating Attention from Future Queries Distribution", arXiv 2510.00636).

Future queries are not known when the prefix is compressed, so their attention is estimated in
closed form: model a future query as Gaussian, q ~ N(R mu, R S R^T), with mu and S the mean and
covariance of the prompt's PRE-RoPE queries and R the rotation of a future position; then
E[exp(s q.k)] = exp(s k.R mu + s^2/2 k^T R S R^T k) (s = 1/sqrt(d)). R is the mean rotation over
the next `future` positions (the paper's approximation). The expected attention softmax_i(z_i)
times ||v_i|| (the expected contribution to the residual stream) ranks the entries, per KV head
(mean over its query heads).

M-RoPE (Qwen2-VL / Qwen2.5-VL): the observer is handed post-RoPE queries; each is un-rotated with
the model's own rotary embedding at its own 3-D position, and future positions are text after
the prompt, where t = h = w = p (so R is the model's rotation at (p, p, p), not a 1-D arange
through the video's 3-D grid). LLaVA-OneVision: the same code with 1-D positions.

Defaults: future=512 positions, sink=4 rows left out of the statistics (the paper's), rows="all"
(statistics from every prompt row but the sinks), cov=True, vnorm=True; ratio=0.5,
budget="uniform", merge="none", sink=4 entries and text kept.

Choices: statistics are gathered over every prefill chunk (running sums of q and q q^T per query
head), so chunked prefill equals one pass; rows="text" takes them from text rows only (the
queries to come are text; before the question there are few).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..stages import check, register
from .evict import EvictionPress
from .importance import ExpectedImportance


@register
@dataclass
class ExpectedAttention(EvictionPress):
    """Expected Attention: keys scored against a Gaussian model of future queries (arXiv 2510.00636)."""

    name: ClassVar[str] = "expected"
    aliases: ClassVar[tuple[str, ...]] = ("expected_attention", "ea")
    needs_question: ClassVar[bool] = False

    future: int = 512
    rows: str = "all"
    cov: bool = True
    vnorm: bool = True

    def validate(self):
        super().validate()
        check(self.future >= 1, f"expected: future must be >= 1, got {self.future}")
        check(self.rows in ("all", "text"), f"expected: rows must be 'all' or 'text', got {self.rows!r}")

    def importance(self):
        return ExpectedImportance(future=self.future, sink=self.sink, rows=self.rows, cov=self.cov, vnorm=self.vnorm)
