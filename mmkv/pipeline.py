"""Pipeline: runs the data path (decode -> encode -> vision presses -> prefill -> KV presses -> decode).

    pipe = mmkv.load("mmkv-tiny", recipe="kivi:2")
    enc = pipe.encode("video.mp4", frames=64)       # vision + prefix KV, computed once
    for q in questions:
        print(pipe.ask(enc, q))                     # each question reuses the prefix KV

When the prefix KV is computed: at `encode()`, unless a stage needs the question first (a
query-aware vision press or prefill policy); then `encode()` keeps the visual tokens and each
`ask()` prefills the whole prompt. When KV presses run (`compress_at`):
- "ask" (default): once the whole prompt (video + question) is prefilled, as in the papers; each
  question compresses its own copy of the prefix cache, and the question's prefill is exact.
- "encode": query-agnostic presses compress the prefix right after it is prefilled, so the kept
  encoding is already small (for many questions or very long videos); the question then attends
  to the compressed prefix. Query-aware presses, and every press after one, still run at ask.
Positions are always the model's positions for the uncompressed prompt; pruned and evicted
tokens never shift the ones that stay.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .attention import forward_context
from .cache import SEPARATOR, TEXT, VISUAL, CompressedCache, PressContext
from .errors import InputError, MmkvWarning
from .io import Media, load_media
from .models.base import Adapter, Prompt
from .recipe import Recipe
from .stats import Result, Stats, Timer, peak_memory, uncompressed_kv_bytes
from .vision.base import VisionContext, VisualTokens

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Encoded:
    """A video or image encoded once: visual tokens after the vision presses, the prompt prefix,
    and (unless deferred) the prefix KV cache after query-agnostic KV presses.

    Reuse it for any number of `Pipeline.ask` calls; it is never modified by them."""

    media: Media
    visual: VisualTokens
    prefix: Prompt
    keep: torch.Tensor            # [L] bool: prefix tokens that enter the LLM
    token_type: torch.Tensor      # [L_kept] int8 TEXT / VISUAL / SEPARATOR
    embeds: torch.Tensor | None   # [L_kept, D] kept prefix embeddings (kept only while prefill is deferred)
    cache: CompressedCache | None
    stats: Stats
    system: str | None = None
    consumed: bool = False
    prefill_state: dict = field(default_factory=dict)
    made_by: dict = field(default_factory=dict)  # what the encoding depends on (Pipeline._maker)

    @property
    def kind(self) -> str:
        return self.visual.kind

    @property
    def prefix_len(self) -> int:
        return int(self.keep.sum())

    @property
    def deferred(self) -> bool:
        return self.cache is None


class _Detokenizer:
    """Incremental text from token ids, holding back incomplete multi-byte characters."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""

    def add(self, tid: int) -> str:
        self.ids.append(tid)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


class Pipeline:
    """A loaded model + a recipe. Build with `mmkv.load(...)`."""

    def __init__(self, adapter: Adapter, recipe: Recipe, base_attn: str = "sdpa", *, chunk_frames: int = 32,
                 prefill_chunk: int = 4096, system: str | None = None, model_name: str = "",
                 compress_at: str = "ask"):
        self.check_options(chunk_frames=chunk_frames, prefill_chunk=prefill_chunk, compress_at=compress_at)
        self.adapter = adapter
        self.recipe = recipe
        self.base_attn = base_attn
        self.chunk_frames = adapter.frames_per_chunk(chunk_frames)
        self.prefill_chunk = prefill_chunk
        self.compress_at = compress_at
        self.system = system
        self.model_name = model_name or getattr(adapter, "path", "")
        self._split_stages()

    @staticmethod
    def check_options(*, chunk_frames: int = 32, prefill_chunk: int = 4096, compress_at: str = "ask") -> None:
        """Raise InputError on a nonsensical option (`mmkv.load` calls it before loading a model)."""
        for name, v in (("chunk_frames", chunk_frames), ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if compress_at not in ("ask", "encode"):
            raise InputError(f"compress_at must be 'ask' or 'encode', got {compress_at!r}")

    def with_recipe(self, recipe) -> "Pipeline":
        """A Pipeline over the same loaded model with another recipe (a preset name, a recipe
        string or a Recipe); nothing is reloaded. It can ask another pipeline's encoding only when
        its own encode would have made the same one: the same vision stages and, unless the
        encoding was made with prefill=False, the same prefill policy and encode-time KV presses
        (KV presses that run at ask may differ); otherwise ask() raises InputError."""
        r = recipe if isinstance(recipe, Recipe) else Recipe.parse(recipe)
        return Pipeline(self.adapter, r, self.base_attn, chunk_frames=self.chunk_frames,
                        prefill_chunk=self.prefill_chunk, system=self.system, model_name=self.model_name,
                        compress_at=self.compress_at)

    # ------------------------------------------------------------------ recipe layout
    def _split_stages(self) -> None:
        r = self.recipe
        vision = r.vision
        n_stream = 0
        for p in vision:
            if not (p.streaming and not p.query_aware):
                break
            n_stream += 1
        self.stream_presses, self.whole_presses = vision[:n_stream], vision[n_stream:]
        self.defer_prefill = any(p.query_aware for p in vision) or bool(getattr(r.prefill, "query_aware", False))
        kv = r.kv
        first_qa = next((i for i, p in enumerate(kv) if p.query_aware), len(kv))
        self._decode_hooks = ([r.prefill] if r.prefill is not None else []) + kv
        # stages that read each decode step's query rows (press_ctx.queries) in on_decode
        self._decode_queries = any(getattr(p, "decode_queries", False) for p in self._decode_hooks)
        if self.compress_at == "encode" and not self.defer_prefill:
            self.kv_encode, self.kv_ask = kv[:first_qa], kv[first_qa:]
        else:
            self.kv_encode, self.kv_ask = [], kv
        # bi-level KV (Video-XL-2, mmkv.cache.bilevel): chunks the prefix prefill, reloads per question
        self.bilevel = next((p for p in kv if getattr(p, "bilevel", False)), None)
        if self.bilevel is not None:
            self.bilevel.check_recipe(r, self.defer_prefill)

    def _maker(self, deferred: bool) -> dict:
        """What an encoding made by this pipeline depends on (checked by ask)."""
        m = {"model": id(self.adapter), "vision stages": [p.spec() for p in self.recipe.vision]}
        if not deferred:  # the prefix KV was computed (and maybe compressed) at encode
            pre = self.recipe.prefill
            m["prefill policy"] = None if pre is None else (pre.spec(), self.compress_at, self.prefill_chunk)
            m["encode-time KV presses"] = [p.spec() for p in self.kv_encode]
        return m

    def _check_encoding(self, encoded: Encoded) -> None:
        made = encoded.made_by
        if not made:
            return
        mine = self._maker(encoded.deferred)
        diff = [k for k in mine if made.get(k) != mine[k]]
        if diff:
            reason = ("it was made with another loaded model" if "model" in diff
                      else f"its {' and '.join(diff)} differ from this pipeline's")
            raise InputError(
                f"this video was encoded by a pipeline with recipe {made['recipe']!r} and cannot be asked by "
                f"this one (recipe {str(self.recipe)!r}): {reason}. Encode it again with this pipeline (an "
                f"encoding can be asked by pipelines over the same model with the same vision stages and, "
                f"unless encoded with prefill=False, the same prefill policy and encode-time KV presses)")

    @property
    def note(self) -> str:
        card = getattr(self.adapter, "card", {}) or {}
        if card.get("trained") is False:
            return "NOTE: the model is UNTRAINED (random weights): its answers are meaningless; the stats are real."
        return ""

    def _press_ctx(self, token_type: torch.Tensor, **kw) -> PressContext:
        a = self.adapter
        return PressContext(token_type=token_type, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                            head_dim=a.head_dim, rotary=self._rotary, **kw)

    def _rotary(self, positions: torch.Tensor):
        """(cos, sin) [m, D] fp32 of the language model's rotary embedding at positions [P, m]."""
        a = self.adapter
        x = torch.empty(0, dtype=torch.float32, device=a.device)
        cos, sin = a.text_model.rotary_emb(x, a.model_positions(positions.to(a.device)))
        return cos[0].float(), sin[0].float()

    # ------------------------------------------------------------------ encode
    @torch.inference_mode()
    def encode(self, video, *, frames: int | None = None, fps: float | None = None, max_frames: int | None = None,
               video_fps: float | None = None, system: str | None = None,
               progress: bool | ProgressFn = False, prefill: bool = True, visual_cache: dict | None = None) -> Encoded:
        """Decode, encode and compress a video (or image) once; see the module docstring.
        `prefill=False` keeps only the visual tokens: each ask() then prefills the whole prompt.
        `visual_cache`: a dict for one video, filled with the vision tower's output per chunk on the
        first encode and reused by later ones (of the same video, by any recipe over the same model):
        benchmarks that run many recipes over each video encode its frames once."""
        media = video if isinstance(video, Media) else load_media(video, frames=frames, fps=fps,
                                                                   max_frames=max_frames, video_fps=video_fps)
        system = self.system if system is None else system
        a = self.adapter
        if media.kind == "video" and a.video_error:
            raise InputError(a.video_error)
        for st in self.recipe.stages:  # stages that take some inputs only (globalcom2: AnyRes images)
            if hasattr(st, "check_input"):
                st.check_input(media.kind, a)
        stats = Stats(recipe=str(self.recipe), model=self.model_name, frames=media.num_frames, device=str(a.device))
        stats.extra.update(media.extra)  # a truncated file: frames promised and frames that decode
        report = _progress(progress)
        with peak_memory(a.device) as peak:
            with Timer(a.device) as t_enc:
                vt = self._encode_visual(media, stats, report, visual_cache)
            prefix = a.prefix(vt, system)
            keep, token_type, embeds = self._assemble(prefix, vt)
            enc = Encoded(media, vt, prefix, keep, token_type, embeds, None, stats, system)
            if prefill and not self.defer_prefill:
                self._check_context(token_type, 0, 0)
                with Timer(a.device) as t_pre:
                    cache = CompressedCache(a.num_layers)
                    cache.set_fused(True)
                    pctx = self._press_ctx(token_type, visual_embeds=vt.embeds, phase="encode",
                                           compress=self.compress_at == "encode", positions=prefix.positions[:, keep])
                    if self.bilevel is not None:
                        self.bilevel.begin(pctx, vt, a, self.recipe)
                    self._prefill(cache, embeds, prefix.positions[:, keep], pctx, report, last_logits=False)
                    self._proxy(cache, pctx, prefix, vt.kind, system)
                    for p in self.kv_encode:
                        p.compress(cache, pctx)
                    enc.prefill_state = {"stats": pctx.stats, "state": pctx.state}
                enc.cache, enc.embeds = cache, None
                stats.prefill_s = t_pre.seconds
            enc.made_by = dict(self._maker(enc.deferred), recipe=str(self.recipe))
        stats.encode_s = t_enc.seconds
        stats.peak_memory_bytes, stats.peak_memory_kind = peak["bytes"], peak["kind"]
        return enc

    def _encode_visual(self, media: Media, stats: Stats, report, cache: dict | None = None) -> VisualTokens:
        a = self.adapter
        vctx = VisionContext(adapter=a, stats=stats.extra)
        counts = {p.name: [0, 0] for p in self.stream_presses}
        if media.kind == "image":
            vt = a.encode_image(media.image())
        else:
            states = [p.start(vctx) for p in self.stream_presses]
            parts, slot, per_slot, n_patches = [], 0, 0, 0
            n_chunks = math.ceil(media.num_frames / self.chunk_frames)
            for i, (frames, ts) in enumerate(media.chunks(self.chunk_frames)):
                key = (self.chunk_frames, i)
                chunk = cache.get(key) if cache is not None else None
                if chunk is None:
                    chunk = a.encode_chunk(frames, ts, slot, slot * per_slot)
                    if cache is not None:
                        cache[key] = chunk
                per_slot = chunk.grid[1] * chunk.grid[2]
                slot += chunk.grid[0]
                n_patches += chunk.num
                for p, st in zip(self.stream_presses, states):
                    counts[p.name][0] += chunk.num
                    chunk = p.step(chunk, st, vctx)
                    counts[p.name][1] += chunk.num
                parts.append(chunk)
                report("encode", i + 1, n_chunks)
            vt = a.finish_video(parts, media)
            for p, st in zip(self.stream_presses, states):
                vt = p.finish(vt, st, vctx)
        stats.visual_tokens.append(("encoder", vt.n_total, vt.n_total))
        whole = self.whole_presses
        if media.kind == "image":  # an image is a single chunk: streaming presses compress it whole
            whole = self.stream_presses + self.whole_presses
        elif self.stream_presses:
            n_sep = vt.n_total - n_patches  # separators the adapter adds after the chunks
            for p in self.stream_presses:
                stats.visual_tokens.append((p.name, counts[p.name][0] + n_sep, counts[p.name][1] + n_sep))
            name, before, _ = stats.visual_tokens[-1]
            stats.visual_tokens[-1] = (name, before, vt.num)
        for p in whole:
            before = vt.num
            vt = p.compress(vt, vctx)
            stats.visual_tokens.append((p.name, before, vt.num))
        if vt.num and not bool((vt.index[1:] > vt.index[:-1]).all()):
            raise RuntimeError("a vision press returned tokens out of sequence order")
        return vt

    def _assemble(self, prefix: Prompt, vt: VisualTokens):
        """Kept prefix tokens: mask over the prompt, their token types, and their embeddings."""
        a = self.adapter
        slots = prefix.visual.nonzero().squeeze(1)            # prompt index of each uncompressed visual token
        keep = ~prefix.visual
        kept_slots = slots[vt.index]
        keep[kept_slots] = True
        order = torch.zeros(len(prefix.ids), dtype=torch.long)
        order[keep] = torch.arange(int(keep.sum()))
        token_type = torch.full((int(keep.sum()),), TEXT, dtype=torch.int8)
        vis_rows = order[kept_slots]
        token_type[vis_rows] = torch.where(vt.is_patch, VISUAL, SEPARATOR).to(torch.int8)
        embeds = torch.empty(int(keep.sum()), vt.embeds.shape[-1], dtype=a.dtype, device=a.device)
        text = ~prefix.visual[keep]
        embeds[text.to(a.device)] = a.embed(prefix.ids[keep][text])
        embeds[vis_rows.to(a.device)] = vt.embeds.to(a.device, a.dtype)
        return keep, token_type, embeds

    def _proxy(self, cache, pctx: PressContext, prefix: Prompt, kind: str, system: str | None) -> None:
        """Show the encode-time presses that ask for one (`proxy`) the rows of a stand-in question
        after the prefix, prefilled over a throwaway copy of the cache (their KV is dropped):
        "tail" is the chat template's assistant header alone, any other text a question."""
        presses = [p for p in self.kv_encode if getattr(p, "proxy", "") and hasattr(p, "observe")]
        if not presses:
            return
        a, text = self.adapter, presses[0].proxy
        if text == "tail":
            ids = torch.tensor(a._tokenize(a._split_template(kind, system)[1]), dtype=torch.long)
            pos = torch.arange(prefix.next_text_position, prefix.next_text_position + len(ids)).expand(a.pos_dims, -1)
        else:
            suf = a.suffix(text, kind, prefix.next_text_position, system)
            ids, pos = suf.ids, suf.positions
        saved, pctx.positions = pctx.positions, torch.cat([pctx.positions, pos], 1)
        observers = [functools.partial(p.observe, ctx=pctx) for p in presses]
        with forward_context(cache=cache.clone(), base=self.base_attn, observers=observers) as fctx:
            a.text_model(inputs_embeds=a.embed(ids)[None], position_ids=a.model_positions(pos.to(a.device)),
                         use_cache=True, **{a.cache_kwarg: fctx.cache})
        pctx.positions = saved

    # ------------------------------------------------------------------ prefill and decode
    def _prefill(self, cache, embeds, positions, pctx: PressContext, report, last_logits=True, record=0):
        """Run the language model over `embeds` [L, D] at `positions` [P, L], chunk by chunk."""
        a = self.adapter
        policy = self.recipe.prefill
        if policy is not None:
            policy.begin(pctx)
        n = embeds.shape[0]
        hidden = None
        observers = [functools.partial(p.observe, ctx=pctx) for p in self.recipe.kv if hasattr(p, "observe")]
        bl, base = self.bilevel, cache.seen  # bi-level: slices end at chunk boundaries, sealed after each
        cuts = [c - base for c in bl.cuts(pctx)] if bl is not None else []
        prepare = [functools.partial(bl.prepare, ctx=pctx)] if bl is not None else []
        with forward_context(cache=cache, base=self.base_attn, policy=policy, record_queries=record,
                             observers=observers, prepare=prepare) as fctx:
            for s, e in _slices(n, self.prefill_chunk, cuts):
                fctx.record_queries = min(record, e - s) if record and e == n else 0
                out = a.text_model(inputs_embeds=embeds[None, s:e], position_ids=a.model_positions(
                    positions[:, s:e].to(a.device)), use_cache=True, **{a.cache_kwarg: cache})
                hidden = out.last_hidden_state[:, -1]
                if bl is not None:
                    bl.after_forward(cache, pctx, base + e, e == n)
                report("prefill", e, n)
            pctx.queries = dict(fctx.queries)
        if policy is not None:
            policy.end(cache, pctx)
        return a.lm_head(hidden).float() if last_logits else None

    def _step(self, cache, token: int, position: int, pctx: PressContext | None = None):
        a = self.adapter
        emb = a.embed(torch.tensor([[token]], device=a.device))
        pos = torch.full((a.pos_dims, 1), position, dtype=torch.long)
        record = 1 if pctx is not None and self._decode_queries else 0
        with forward_context(cache=cache, base=self.base_attn, record_queries=record) as fctx:
            out = a.text_model(inputs_embeds=emb, position_ids=a.model_positions(pos.to(a.device)),
                               use_cache=True, **{a.cache_kwarg: cache})
        if record:
            pctx.queries = dict(fctx.queries)  # this step's query rows, for on_decode
        return a.lm_head(out.last_hidden_state[:, -1]).float()

    # ------------------------------------------------------------------ ask
    @torch.inference_mode()
    def ask(self, encoded: Encoded, question: str, *, max_new_tokens: int = 64, do_sample: bool = False,
            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
            reuse: bool = True, on_text: Callable[[str], None] | None = None,
            progress: bool | ProgressFn = False, output_scores: bool = False) -> Result:
        """Answer `question` about an encoded video. With reuse=False the encoding's cache is
        consumed (no copy; the encoding cannot be asked again). `output_scores=True` keeps the
        logits of every generated position in `result.scores` ([vocab] fp32 tensors).
        For follow-up questions that see the earlier answers, use `chat(encoded)`."""
        return self._ask(encoded, question, None, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, reuse=reuse,
                         on_text=on_text, progress=progress, output_scores=output_scores)

    def chat(self, encoded: Encoded) -> "Conversation":
        """A conversation over an encoded video: `conv.ask(q1)`, then `conv.ask(q2)` sees q1 and its
        answer. The recipe's ask-time KV presses compress once, after the first question's
        prefill; later questions and answers run over that cache. The encoding is not modified."""
        return Conversation(self, encoded)

    def _ask(self, encoded: Encoded, question: str, session: "_Session | None", *, max_new_tokens: int,
             do_sample: bool, temperature: float, top_k: int, top_p: float, seed: int | None, reuse: bool,
             on_text, progress, output_scores: bool) -> Result:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise InputError(f"temperature must be positive when sampling, got {temperature}")
        if encoded.consumed:
            raise InputError("this encoded video was consumed by ask(reuse=False); encode it again")
        self._check_encoding(encoded)
        a = self.adapter
        report = _progress(progress)
        stats = replace(encoded.stats, recipe=str(self.recipe), visual_tokens=list(encoded.stats.visual_tokens), extra=dict(encoded.stats.extra))
        follow_up = session is not None and session.cache is not None
        if follow_up:
            # the answer's unfed last token (when it ended on max_new_tokens), then the next turn
            start_pos = session.position + len(session.pending)
            turn = a.next_turn(question, encoded.kind, start_pos, encoded.system)
            ids = torch.cat([torch.tensor(session.pending, dtype=torch.long), turn.ids])
            positions = torch.arange(session.position, start_pos + len(turn.ids)).expand(a.pos_dims, -1).clone()
            next_position = start_pos + len(turn.ids)
            self._check_context(session.pctx.token_type, len(ids), max_new_tokens)
        else:
            suffix = a.suffix(question, encoded.kind, encoded.prefix.next_text_position, encoded.system)
            self._check_context(encoded.token_type, len(suffix.ids), max_new_tokens)
            # generated tokens continue after the largest prompt position (as transformers' rope_deltas do)
            next_position = max(encoded.prefix.max_position, suffix.max_position) + 1
            ids, positions = suffix.ids, suffix.positions
        q_emb = a.embed(ids)
        with peak_memory(a.device) as peak:
            with Timer(a.device) as t_pre:
                if follow_up:
                    cache, pctx = session.cache, session.pctx
                    start = len(pctx.token_type)
                    pctx.token_type = torch.cat([pctx.token_type, torch.full((len(ids),), TEXT, dtype=torch.int8)])
                    pctx.question, pctx.question_embeds, pctx.compress = (start, start + len(ids)), q_emb, False
                    embeds = q_emb
                    token_type = pctx.token_type
                    logits = self._prefill(cache, embeds, positions, pctx, report)
                else:
                    all_positions = torch.cat([encoded.prefix.positions[:, encoded.keep], positions], 1)
                    if encoded.deferred:
                        cache = CompressedCache(a.num_layers)
                        cache.set_fused(True)
                        embeds = torch.cat([encoded.embeds, q_emb])
                        positions = all_positions
                    else:
                        cache = encoded.cache.clone() if (reuse or session is not None) else encoded.cache
                        embeds = q_emb
                    token_type = torch.cat([encoded.token_type, torch.full((len(ids),), TEXT, dtype=torch.int8)])
                    start = encoded.prefix_len
                    pctx = self._press_ctx(token_type, question=(start, start + len(ids)), question_embeds=q_emb,
                                           visual_embeds=encoded.visual.embeds, positions=all_positions)
                    pctx.stats.update(encoded.prefill_state.get("stats", {}))
                    pctx.state.update(encoded.prefill_state.get("state", {}))
                    record = len(ids) if any(p.query_aware for p in self.kv_ask) else 0
                    logits = self._prefill(cache, embeds, positions, pctx, report, record=record)
                    for p in self.kv_ask:
                        p.compress(cache, pctx)
                pctx.queries = {}
            if not reuse and session is None:
                encoded.consumed, encoded.cache = True, None
            stats.kv_len_per_layer = cache.lengths()
            # the baseline: the model's own cache of the prompt before any vision press (stats.py)
            full = len(token_type) + len(encoded.prefix.ids) - encoded.prefix_len   # + the pruned visual tokens
            geom = (a.num_layers, a.num_kv_heads, a.head_dim, a.dtype)
            stats.kv_bytes, stats.kv_dtype = cache.nbytes(), str(a.dtype).replace("torch.", "")
            stats.kv_bytes_uncompressed = uncompressed_kv_bytes(full, *geom)
            stats.kv_bytes_after_vision = uncompressed_kv_bytes(len(token_type), *geom)
            stats.kv_bytes_by_class, stats.kv_index_bytes = cache.bytes_by_class(), cache.index_nbytes()
            stats.prompt_tokens = len(token_type)
            with Timer(a.device) as t_dec:
                scores: list | None = [] if output_scores else None
                tokens, fed = self._decode(cache, logits, next_position, pctx, max_new_tokens, do_sample,
                                           temperature, top_k, top_p, seed, on_text, report, scores)
        if session is not None:
            session.cache, session.pctx = cache, pctx
            session.position = next_position + fed
            session.pending = tokens[fed:]
        stats.prefill_s = (0.0 if follow_up else stats.prefill_s) + t_pre.seconds
        stats.decode_s = t_dec.seconds
        stats.new_tokens = len(tokens)
        stats.peak_memory_bytes = max(stats.peak_memory_bytes, peak["bytes"])
        stats.peak_memory_kind = peak["kind"]
        stats.extra.update(pctx.stats)
        stats.extra["kv_bytes_final"] = cache.nbytes()
        text = a.tokenizer.decode(tokens, skip_special_tokens=True)
        return Result(text=text.strip(), stats=stats, tokens=tokens, note=self.note, scores=scores)

    def _decode(self, cache, logits, position, pctx, max_new_tokens, do_sample, temperature, top_k, top_p, seed,
                on_text, report, scores=None) -> tuple[list[int], int]:
        """Generated tokens, and how many of them were fed back into the cache (all but the last,
        unless generation ended on a stop token)."""
        stop = self.adapter.stop_ids()
        gen = torch.Generator(device="cpu").manual_seed(seed) if (do_sample and seed is not None) else None
        detok = _Detokenizer(self.adapter.tokenizer) if on_text else None
        tokens: list[int] = []
        for step in range(max_new_tokens):
            if scores is not None:
                scores.append(logits[0].cpu())
            tok = _select(logits[0], do_sample, temperature, top_k, top_p, gen)
            if tok in stop:
                return tokens, len(tokens)
            tokens.append(tok)
            if detok is not None:
                delta = detok.add(tok)
                if delta:
                    on_text(delta)
            report("decode", step + 1, max_new_tokens)
            if step == max_new_tokens - 1:
                return tokens, len(tokens) - 1
            pctx.token_type = torch.cat([pctx.token_type, torch.tensor([TEXT], dtype=torch.int8)])
            logits = self._step(cache, tok, position + step, pctx)
            for p in self._decode_hooks:
                p.on_decode(cache, pctx, step)
        return tokens, len(tokens)

    # ------------------------------------------------------------------ one call
    def generate(self, video, question: str, *, frames: int | None = None, fps: float | None = None,
                 max_frames: int | None = None, video_fps: float | None = None, system: str | None = None,
                 progress: bool | ProgressFn = False, **ask_kwargs) -> Result:
        """Encode `video` and answer `question` (the encoding is consumed, not copied)."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty; ask something about the video")
        if not isinstance(video, Media):
            video = load_media(video, frames=frames, fps=fps, max_frames=max_frames, video_fps=video_fps)
        # a question longer than the model's context fails before the vision tower runs (media
        # the family does not take fail in encode)
        if video.kind in self.adapter.placeholder:
            q = self.adapter.suffix(question, video.kind, 0, self.system if system is None else system)
            self._check_context(torch.zeros(0, dtype=torch.int8), len(q.ids), 0)
        # one question: prefill the whole prompt in one pass (as plain generate does), unless the
        # prefix must be compressed on its own first (compress_at="encode")
        enc = self.encode(video, frames=frames, fps=fps, max_frames=max_frames, video_fps=video_fps, system=system,
                          progress=progress, prefill=bool(self.kv_encode) or self.bilevel is not None)
        return self.ask(enc, question, reuse=False, progress=progress, **ask_kwargs)

    def _check_context(self, token_type: torch.Tensor, n_more_text: int, new_tokens: int) -> None:
        """Before any prefill: refuse a prompt (prefix tokens `token_type`, `n_more_text` question
        tokens, `new_tokens` to generate) longer than the model's positions, naming the counts, the
        limit and what to change; warn when only the model's rope scaling admits it."""
        trained, allowed, how = self.adapter.context_limit()
        n_vis = int((token_type != TEXT).sum())
        n_text = len(token_type) - n_vis + n_more_text
        total = n_vis + n_text + new_tokens
        if not trained or total <= trained:
            return
        what = f"the prompt is {n_vis + n_text:,} tokens ({n_vis:,} visual + {n_text:,} text)" + (
            f" + {new_tokens:,} new tokens = {total:,}" if new_tokens else "")
        if n_vis + n_text <= trained:
            fix = f"ask for at most {trained - n_vis - n_text:,} new tokens (max_new_tokens)"
        elif n_text >= n_vis:
            fix = "shorten the question"
        else:
            fix = ("sample fewer frames (frames= / max_frames=, --frames / --max-frames) or add a vision press "
                   "to the recipe (e.g. 'evs:0.25' or 'pvc')")
        if allowed is None or total > allowed:
            scaled = f" with its {how}" if how else " (max_position_embeddings)"
            raise InputError(f"{what}, over the {allowed or trained:,} positions this model takes{scaled}; {fix}")
        warnings.warn(f"{what}, past the {trained:,} positions the model was trained on ({how} admits "
                      f"{allowed:,}; answers may degrade); to stay within them, {fix}", MmkvWarning, stacklevel=3)


@dataclass
class _Session:
    """A conversation's state: its cache (with the earlier turns), the press context, the next
    position, and the answer tokens not yet fed into the cache."""

    cache: CompressedCache | None = None
    pctx: PressContext | None = None
    position: int = 0
    pending: list = field(default_factory=list)


class Conversation:
    """Questions and answers in one conversation over an encoded video (`Pipeline.chat`)."""

    def __init__(self, pipeline: Pipeline, encoded: Encoded):
        self.pipeline, self.encoded = pipeline, encoded
        self._session = _Session()
        self.turns: list[tuple[str, Result]] = []

    @torch.inference_mode()
    def ask(self, question: str, **kwargs) -> Result:
        """Answer `question` with the earlier questions and answers in context. Takes ask()'s
        generation arguments (max_new_tokens, do_sample, temperature, on_text, ...)."""
        kw = dict(max_new_tokens=64, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                  on_text=None, progress=False, output_scores=False)
        unknown = set(kwargs) - set(kw)
        if unknown:
            raise TypeError(f"Conversation.ask() got unexpected arguments: {', '.join(sorted(unknown))}")
        kw.update(kwargs)
        r = self.pipeline._ask(self.encoded, question, self._session, reuse=True, **kw)
        self.turns.append((question, r))
        return r


def _slices(n: int, step: int, cuts=()):
    """(start, end) prefill slices of at most `step` tokens over [0, n), ending at every cut."""
    s = 0
    for m in sorted({c for c in cuts if 0 < c < n} | {n}):
        while s < m:
            e = min(m, s + step)
            yield s, e
            s = e


def _select(logits: torch.Tensor, do_sample, temperature, top_k, top_p, gen) -> int:
    if not do_sample:
        return int(torch.argmax(logits))
    x = logits.float().cpu() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(x, min(top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(x, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) > top_p
        x[idx[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen))


def _progress(progress) -> ProgressFn:
    """progress=True: tqdm bars on stderr; a callable gets (stage, done, total); False: nothing."""
    if callable(progress):
        return progress
    if not progress:
        return lambda *a: None
    from tqdm.auto import tqdm

    bars: dict = {}

    def report(stage, done, total):
        bar = bars.get(stage)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="tok" if stage != "encode" else "chunk",
                                     leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bars.pop(stage, None)

    return report
