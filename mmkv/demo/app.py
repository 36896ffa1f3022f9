"""The Gradio app: upload a long video, pick model / recipe / frames, chat over one encoding.

    from mmkv.demo import DemoConfig, build_app
    app = build_app(DemoConfig(max_upload="5gb"))
    app.launch(server_name="127.0.0.1", server_port=7860, max_file_size=app.mmkv_config.max_upload_bytes)

or `mmkv demo` (see `mmkv demo -h`). `launch()` below does the same and cleans the upload folder
on exit. The handlers are thin: the work is in `mmkv.demo.state.Demo`.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

from ..errors import InputError
from .config import SAMPLE_VIDEO, DemoConfig
from .render import CSS, layers_html, memory_html, stats_rows, status_html, timing_html, tokens_html
from .state import Demo, preset_rows, recipe_choices, sample_question, stage_rows
from .thumbs import thumbnails
from .uploads import UploadDir, check_upload, user_message

log = logging.getLogger("mmkv.demo")

INTRO = """# mmkv: ask questions about long videos
Upload a video (or use the bundled sample), choose a model, a compression recipe and how many
frames to sample, then chat. The video is **encoded once**; every question reuses that encoding.
Below the chat: which visual tokens were kept per frame, the KV cache memory against the
uncompressed cache, ratios per layer, and the time spent."""


def _new_state() -> dict:
    return {"video": None, "name": None, "info": "", "eid": None, "key": None}


def _recipes_markdown() -> str:
    rows = ["| preset | recipe | what it does |", "|---|---|---|"]
    rows += [f"| `{n}` | `{spec}` | {doc} |" for n, spec, doc in preset_rows()]
    rows += ["", "Any recipe string also works, e.g. `kivi:2` or `streaming:recent=256+kivi:4`. Stages:", "",
             "| kind | stage | |", "|---|---|---|"]
    rows += [f"| {kind} | `{name}` | {doc} |" for kind, name, doc in stage_rows()]
    return "\n".join(rows)


def _chatbot_kwargs(gr) -> dict:
    """Messages-format chat on gradio 5 (where it is opt-in) and 6 (where it is the only format)."""
    import inspect

    params = inspect.signature(gr.Chatbot.__init__).parameters
    kw = {"type": "messages"} if "type" in params else {}
    if "feedback_options" in params:
        kw["feedback_options"] = None
    return kw


def build_app(config: DemoConfig | None = None, demo: Demo | None = None):
    """Build the Gradio Blocks. Uploads go to `config.upload_dir` (a fresh temporary folder if
    None); `app.mmkv_uploads.remove()` deletes it (done by `launch()` on exit)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    config = config or DemoConfig()
    demo = demo or Demo(config)
    uploads = UploadDir(config.upload_dir)
    # Gradio stores uploads (and images it serves) under GRADIO_TEMP_DIR, read when the Blocks and
    # its server are created: point it at our folder so no upload is written anywhere else.
    os.environ["GRADIO_TEMP_DIR"] = uploads.path

    import gradio as gr

    def release(state):
        if isinstance(state, dict):
            demo.drop(state.get("eid"))

    def warn(msg: str):
        try:
            gr.Warning(msg)
        except Exception:  # noqa: BLE001 - outside a request (tests): the status box still shows it
            pass

    recipes = recipe_choices()
    default_recipe = config.recipe if config.recipe else "none"

    with gr.Blocks(title="mmkv demo", analytics_enabled=False) as app:
        gr.HTML(f"<style>{CSS}</style>")
        gr.Markdown(INTRO)
        state = gr.State(_new_state(), time_to_live=config.session_ttl, delete_callback=release)
        with gr.Row():
            with gr.Column(scale=5):
                video = gr.Video(label="Video", sources=["upload"], elem_id="mmkv-video", height=300)
                sample_btn = gr.Button("Use the bundled sample video", size="sm", elem_id="mmkv-sample")
                with gr.Row():
                    model = gr.Dropdown(config.models, value=config.models[0], label="Model",
                                        allow_custom_value=config.allow_custom_model, elem_id="mmkv-model")
                    recipe = gr.Dropdown(recipes if default_recipe in recipes else [default_recipe] + recipes,
                                         value=default_recipe, label="Recipe (preset or recipe string)",
                                         allow_custom_value=True, elem_id="mmkv-recipe")
                with gr.Row():
                    frames = gr.Slider(1, config.max_frames, value=config.frames, step=1, label="Frames",
                                       info="uniform over the video; with fps, the cap", elem_id="mmkv-frames")
                    fps = gr.Number(config.fps, label="fps (0 = uniform frames)", minimum=0, elem_id="mmkv-fps")
                max_new = gr.Slider(1, config.max_new_tokens, value=min(64, config.max_new_tokens), step=1,
                                    label="Max new tokens", elem_id="mmkv-max-new")
                encode_btn = gr.Button("Encode video", elem_id="mmkv-encode")
                status = gr.HTML(status_html("Upload a video to start."), elem_id="mmkv-status", min_height=64)
                with gr.Accordion("Presets and stages", open=False):
                    gr.Markdown(_recipes_markdown())
            with gr.Column(scale=6):
                chat = gr.Chatbot(label="Chat", elem_id="mmkv-chat", height=420, **_chatbot_kwargs(gr))
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the video…", show_label=False, scale=5,
                                          elem_id="mmkv-question", lines=1, max_lines=6)
                    ask_btn = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="mmkv-ask")
                new_chat = gr.Button("New chat (keep the encoding)", size="sm")
        gallery = gr.Gallery(label="Kept tokens per frame (dimmed cells were dropped)", elem_id="mmkv-thumbs",
                             columns=6, object_fit="contain", preview=False)
        with gr.Row():
            tokens_box = gr.HTML(elem_id="mmkv-tokens-box")
            memory_box = gr.HTML(elem_id="mmkv-memory-box")
        with gr.Row():
            layers_box = gr.HTML(elem_id="mmkv-layers-box")
            time_box = gr.HTML(elem_id="mmkv-time-box")
        with gr.Accordion("All stats of the last answer", open=False):
            stats_df = gr.Dataframe(headers=["stat", "value"], elem_id="mmkv-stats", interactive=False, wrap=True)

        outputs_reset = [chat, gallery, tokens_box, memory_box, layers_box, time_box, stats_df]

        def _cleared():
            return {chat: [], gallery: None, tokens_box: "", memory_box: "", layers_box: "", time_box: "",
                    stats_df: None}

        # ------------------------------------------------------------ handlers
        def reject(path, st, msg):
            """Show the error, delete the rejected file, put the session's previous video back."""
            warn(msg)
            if path and uploads.contains(path):
                uploads.discard(path)
            keep = st.get("video") if st.get("video") and os.path.isfile(st["video"]) else None
            tail = f" Still using {st['name']!r}." if st.get("video") else ""
            return {video: keep, status: status_html(msg + tail, error=True), state: st}

        def set_video(path, st, name=None):
            st = dict(st or _new_state())
            try:
                info = check_upload(path, config, name=name)
            except InputError as e:
                return reject(path, st, f"upload rejected: {e}")
            except Exception as e:  # noqa: BLE001 - never let a bad file take the app down
                log.exception("upload check failed")
                shown = name or os.path.basename(path or "")
                return reject(path, st, f"upload rejected: {user_message(e, {path: shown})}")
            demo.drop(st.get("eid"))
            st.update(video=info.path, name=info.name, info=info.describe(), eid=None, key=None)
            out = _cleared()
            out.update({status: status_html(f"Ready: {info.describe()}. Ask a question: the video is encoded "
                                            "first (once), then every question reuses the encoding."), state: st})
            return out

        def on_upload(path, st):
            return set_video(path, st)

        def on_sample(st):
            # a copy inside the upload folder: served like any upload, whatever the install location
            path = os.path.join(uploads.path, "sample", os.path.basename(SAMPLE_VIDEO))
            if not os.path.isfile(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copyfile(SAMPLE_VIDEO, path)
            out = set_video(path, st)
            out[video] = path
            out[question] = sample_question()
            return out

        def on_clear(st):
            st = dict(st or _new_state())
            if st.get("video"):
                msg = (f"Video removed from the player. Questions still go to {st['name']!r} until you upload "
                       "another video.")
            else:
                msg = "Upload a video to start."
            return {status: status_html(msg), state: st}

        def ensure_encoded(st, model_v, recipe_v, frames_v, fps_v, progress):
            """(Encoded, Pipeline, updates) for the session's video with the current settings."""
            if not st.get("video"):
                raise InputError("no video yet: upload a video (or use the bundled sample) first")
            frames_n, fps_f = demo.check_frames(frames_v, fps_v)
            key = demo.settings_key(st["video"], model_v, recipe_v, frames_n, fps_f)
            hit = demo.encoding(st.get("eid"), key)
            if hit is not None:
                return hit[0], hit[1], {}
            t0 = time.perf_counter()
            eid, enc = demo.encode(st["video"], model_v, recipe_v, frames_n, fps_f, name=st.get("name"),
                                   progress=lambda f, d: progress(f, desc=d))
            demo.drop(st.get("eid"))
            st.update(eid=eid, key=key)
            _, pipe = demo.encoding(eid)
            n_kept, n_all = enc.visual.num, enc.visual.n_total
            msg = (f"Encoded {st['name']}: {enc.media.num_frames} frames → {n_kept}/{n_all} visual tokens kept, "
                   f"in {time.perf_counter() - t0:.1f} s.")
            if pipe.note:
                msg += " " + pipe.note
            updates = {gallery: thumbnails(enc, config.thumbnails), tokens_box: tokens_html(enc.stats, enc),
                       status: status_html(msg)}
            return enc, pipe, updates

        def do_encode(st, model_v, recipe_v, frames_v, fps_v, progress=gr.Progress()):
            st = dict(st or _new_state())
            try:
                _, _, updates = ensure_encoded(st, model_v, recipe_v, frames_v, fps_v, progress)
                if not updates:
                    updates = {status: status_html(f"{st['name']} is already encoded with these settings.")}
            except Exception as e:  # noqa: BLE001 - shown in the page, the app keeps running
                if not isinstance(e, InputError):
                    log.exception("encode failed")
                msg = user_message(e, {st.get("video") or "": st.get("name") or ""})
                warn(msg)
                updates = {status: status_html(msg, error=True)}
            updates[state] = st
            return updates

        def do_ask(q, history, st, model_v, recipe_v, frames_v, fps_v, max_new_v, progress=gr.Progress()):
            st = dict(st or _new_state())
            history = list(history or [])
            try:
                if not isinstance(q, str) or not q.strip():
                    raise InputError("the question is empty; type a question about the video")
                enc, pipe, updates = ensure_encoded(st, model_v, recipe_v, frames_v, fps_v, progress)
            except Exception as e:  # noqa: BLE001
                if not isinstance(e, InputError):
                    log.exception("encode failed")
                msg = user_message(e, {st.get("video") or "": st.get("name") or ""})
                warn(msg)
                yield {status: status_html(msg, error=True), state: st}
                return
            history += [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": ""}]
            updates.setdefault(status, status_html(f"Answering about {st['name']}…"))
            updates.update({chat: history, state: st, question: ""})
            yield updates
            answer = ""
            try:
                for kind, value in demo.ask_stream(enc, pipe, q, max_new_tokens=int(max_new_v),
                                                   progress=lambda f, d: progress(f, desc=d)):
                    if kind == "text":
                        answer += value
                        history[-1] = {"role": "assistant", "content": answer}
                        yield {chat: history}
                    else:
                        res = value
                        history[-1] = {"role": "assistant", "content": res.text or "(empty answer)"}
                        s = res.stats
                        msg = (f"Answered about {st['name']} with recipe {s.recipe}: KV {s.kv_bytes / 2**20:.2f} MiB "
                               f"stored vs {s.kv_bytes_fp16 / 2**20:.2f} MiB uncompressed; prefill "
                               f"{s.prefill_s:.2f} s, decode {s.decode_s:.2f} s.")
                        if res.note:
                            msg += " " + res.note
                        yield {chat: history, status: status_html(msg), memory_box: memory_html(s),
                               layers_box: layers_html(s), time_box: timing_html(s, enc.stats.encode_s),
                               tokens_box: tokens_html(s, enc), stats_df: stats_rows(s)}
            except Exception as e:  # noqa: BLE001
                if not isinstance(e, InputError):
                    log.exception("ask failed")
                msg = user_message(e)
                warn(msg)
                history = history[:-2] if not answer else history
                yield {chat: history, status: status_html(msg, error=True), question: q}

        # ------------------------------------------------------------ events
        upload_outs = [video, status, state, question] + outputs_reset
        video.upload(on_upload, [video, state], upload_outs, concurrency_limit=4, concurrency_id="io",
                     show_progress="minimal")
        video.clear(on_clear, [state], [status, state], concurrency_limit=4, concurrency_id="io")
        sample_btn.click(on_sample, [state], upload_outs, concurrency_limit=4, concurrency_id="io")
        model_in = [state, model, recipe, frames, fps]
        model_out = [status, gallery, tokens_box, state]
        encode_btn.click(do_encode, model_in, model_out, concurrency_id="model",
                         concurrency_limit=config.concurrency, show_progress="full", show_progress_on=[status])
        ask_in = [question, chat, state, model, recipe, frames, fps, max_new]
        ask_out = [chat, status, question, state, gallery, tokens_box, memory_box, layers_box, time_box, stats_df]
        for ev in (ask_btn.click, question.submit):
            ev(do_ask, ask_in, ask_out, concurrency_id="model", concurrency_limit=config.concurrency,
               show_progress="full", show_progress_on=[status])
        new_chat.click(lambda: [], None, chat)

    app.queue(default_concurrency_limit=config.concurrency, max_size=config.queue_size)
    app.mmkv_config, app.mmkv_demo, app.mmkv_uploads = config, demo, uploads
    app.mmkv_sweeper = _Sweeper(uploads, config.upload_ttl)
    return app


class _Sweeper:
    """A daemon thread deleting uploads older than `ttl` seconds, every ttl / 4 (at least 10 s)."""

    def __init__(self, uploads: UploadDir, ttl: float):
        import threading

        self.uploads, self.ttl = uploads, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mmkv-demo-sweeper")

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(max(10.0, self.ttl / 4)):
            n = self.uploads.sweep(self.ttl)
            if n:
                log.info("deleted %d old upload(s)", n)

    def stop(self):
        self._stop.set()


def launch(config: DemoConfig | None = None, *, host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, block: bool = True, demo: Demo | None = None, **launch_kwargs):
    """Build and serve the app. With block=False returns the app (call `close(app)` to stop it and
    delete its uploads); with block=True serves until interrupted, then cleans up."""
    app = build_app(config, demo)
    cfg = app.mmkv_config
    app.mmkv_sweeper.start()
    try:
        app.launch(server_name=host, server_port=port, share=share, max_file_size=cfg.max_upload_bytes,
                   prevent_thread_lock=True, show_error=True, **launch_kwargs)
    except BaseException:
        try:
            close(app)
        except Exception:  # noqa: BLE001 - report the launch failure, not the clean-up's
            pass
        raise
    if not block:
        return app
    print(f"* Uploads go to {app.mmkv_uploads.path} (deleted on exit)", flush=True)
    _sigterm_as_interrupt()
    try:
        app.block_thread()  # returns on Ctrl-C (and on SIGTERM, turned into one above)
    finally:
        close(app)
    return app


def _sigterm_as_interrupt() -> None:
    """`kill PID` stops the server like Ctrl-C does, so the upload folder is deleted."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def close(app) -> None:
    """Stop the server and delete the upload folder."""
    try:
        app.close()
    finally:
        app.mmkv_sweeper.stop()
        app.mmkv_uploads.remove()


__all__ = ["build_app", "launch", "close", "DemoConfig"]
