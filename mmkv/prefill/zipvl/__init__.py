"""ZipVL: layer-adaptive token-sparse prefill and mixed-precision KV (He et al., "ZipVL: Efficient
Large Vision-Language Models with Dynamic Token Sparsification", arXiv 2410.08584; ICCV 2025 as
"ZipVL: Accelerating VLMs through Dynamic Token Sparsity").

Per decoder layer, during prefill (keys after RoPE):
1. probe queries P: the `probes_recent` most recent queries plus `probes_random` drawn uniformly
   (without replacement, seeded) from the others;
2. probe attention A' = softmax(Q[P] K^T * scaling + causal mask), computed explicitly (the layer's
   real output still comes from SDPA / the sparse kernel), summed over heads, batch and probe rows:
   a_j = attention key j receives;
3. layer-adaptive budget (Eq. 6): p = the fewest keys whose raw a_j, largest first, reach tau *
   sum_j a_j (tau = 1 keeps every key; `ratio` fixes p = ceil(ratio * n) instead, the paper's
   fixed-ratio ablation);
4. important set T (Eq. 7-8): the top-p keys by the normalized score a_j / nnz_j, nnz_j = the
   number of probes allowed to see key j (probes at or after j);
5. token-sparse attention: O_T = Attention(Q[T], K[T], V[T]), causal within the subset by original
   position (`mmkv.kernels.sparse_prefill`: Triton on CUDA, gather + SDPA elsewhere), unless p / n
   is above the break-even `dense_above`, where the layer attends densely (sparse would be slower);
6. KV (when the pipeline compresses, `press_ctx.compress`): T's keys and values at `bits_high`, the
   rest at `bits_low` (paper v1, kv="mixed"), or the rest evicted (paper v2, kv="evict");
7. decoding: every `every` generated tokens, the attention of those tokens' queries over all keys
   re-runs 3-4 on the new tokens, which are then quantized (mixed) or evicted (evict).

Defaults: tau=0.975 (the paper reports 0.96 and 0.975), 64 recent + 64 random probes, 4/2 bits,
re-selection every 100 tokens. Provenance of each (methods.md §1): the probe counts, the 4/2-bit
split and the 100-token interval are [SEC]; the official code is not available.

Choices where the paper is silent, and deviations (each also in docs/zipvl.md):
- Unimportant query rows (rows="keys", default): they attend to the important keys T (cost n*p
  instead of p^2 / 2). rows="zero" gives them a zero attention output instead, so those tokens skip
  token mixing in this layer (residual + FFN only) [INF, methods.md]. "zero" was the first default;
  on the trained bundled model it took the needle benchmark from 97% to 50% at tau=0.975 (the
  question's own tokens, which must read the video, are mostly outside T), while "keys" kept 97%
  (`mmkv bench quality`, BENCHMARKS.md).
- Break-even (not in the paper): a layer whose kept ratio is above `dense_above` attends densely.
  Default None: the CPU break-even of the rows mode measured by benchmarks/zipvl_breakeven.py
  (`budget.BREAK_EVEN`: 0.4 for "keys", 0.9 for "zero"); before it, ZipVL was slower than dense
  wherever tau kept 81-94% of the keys (0.84x on the bundled model). The GPU kernel's break-even
  is not measured.
- Dense layers: the first `dense_layers` (2) layers attend densely (they still score for the KV).
- Heads: a_j sums every query head (GQA groups included), giving one T per layer shared by heads.
- Chunked prefill (prompts longer than the pipeline's prefill_chunk, or encode() then ask()): each
  chunk picks its own probes among its queries and its T among all keys held; the KV selection
  uses a_j and nnz_j summed over every chunk's probes (one chunk: exactly the paper). A chunk with
  no more queries than probes is attended densely, from the probe rows themselves (they are the
  whole attention then), e.g. the question at ask() after encode().
- query_aware=False (default): encode() prefills the video once (probes from the prompt before the
  question); the question's probes join at ask(). query_aware=True defers the whole prefill to
  ask(), so the probes include the question as in the paper's single prefill (generate() always
  prefills video + question in one call).
- KV quantizer granularity follows ZipCache [INF]: keys per channel (one min-max per channel over
  the class's tokens), values channel-separable per token (x / sqrt(max|x|) per channel, then
  min-max per token). ZipCache shares one channel scale across both classes; here each class has
  its own (self-contained segments; D fp16 values per head and class). T is shared by the heads.
- Decode re-selection normalizes the new tokens' scores by how many of the recorded queries can
  see them, as in step 4 (ZipCache's decode path leaves them unnormalized).

Also registered on its own as the transformers attention implementation "zipvl" (plus its mask
function) for plain HF models, sparse prefill only (see `zipvl_session`).

Modules: `probes` (probe queries and the attention they give each key), `budget` (Eq. 6-8: how
many keys, which ones, and when a layer runs dense), `policy` (the ZipVL stage: sparse prefill,
stats), `kv` (mixed-precision / evicting KV storage and decode re-selection), `hf` (the
standalone transformers attention implementation "zipvl" and `zipvl_session`).
"""
from .budget import adaptive_budget, select_important
from .hf import ATTN_NAME, zipvl_attention, zipvl_mask, zipvl_session
from .kv import ZipSegment
from .policy import ZipVL
from .probes import pick_probes, probe_attention, probes_seeing

__all__ = ["ATTN_NAME", "ZipSegment", "ZipVL", "adaptive_budget", "pick_probes", "probe_attention", "probes_seeing",
           "select_important", "zipvl_attention", "zipvl_mask", "zipvl_session"]
