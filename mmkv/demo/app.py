"""The Gradio app: upload a long video, pick model / recipe / frames, chat over one encoding.

    from mmkv.demo import DemoConfig, build_app
    app = build_app(DemoConfig(max_upload="5gb"))
    app.launch(server_name="127.0.0.1", server_port=7860)    # the upload limit applies by itself

or `mmkv demo` (see `mmkv demo -h`). `launch()` below does the same, sweeps old and unchecked
uploads, and cleans the upload folder on exit. The handlers are thin: the work is in
`mmkv.demo.state.Demo` (models, encodings) and `mmkv.demo.session` (a tab's chat and queue).

Asking is two steps: `ask` (instant, outside the model queue) checks the settings, shows the
question in the chat with a placeholder reply and queues it in the tab's session; `answer` (in
the model queue) then runs the oldest queued job, writing the encoding's progress and the
streamed answer into that placeholder. A question asked while a video encodes is therefore shown
at once and answered when the encoding is done. Every ask or encode first resets the status box,
so no earlier error stays beside a message of Gradio's own (e.g. a value out of a slider's range).
"""
from __future__ import annotations

import logging
import os
import shutil
import time

from ..errors import InputError, MmkvError
from .config import SAMPLE_VIDEO, DemoConfig
from .render import (CSS, answered_text, encoded_text, layers_html, memory_html, recipes_html, stats_rows, status_html,
                     timing_html, tokens_html)
from .session import Session, Settings, run_job
from .state import Demo, model_note, preset_rows, recipe_choices, sample_question, stage_rows
from .thumbs import save_thumbnails, slot_words, thumbnails
from .uploads import Sweeper, UploadDir, check_upload, user_message

log = logging.getLogger("mmkv.demo")

INTRO = """# mmkv: ask questions about long videos
Upload a video (or use the bundled sample), choose a model, a compression recipe and how many
frames to sample, then chat. The video is **encoded once**; every question reuses that encoding.
Below the chat: which visual tokens were kept over time, the KV cache memory against the
uncompressed cache, figures per layer, and the time spent."""

GALLERY_LABEL = "Kept tokens per {one} (dimmed cells were dropped)"


def _recipes_html() -> str:
    return recipes_html(preset_rows(), stage_rows())


def _chatbot_kwargs(gr) -> dict:
    """Messages-format chat on gradio 5 (where it is opt-in) and 6 (where it is the only format)."""
    import inspect

    params = inspect.signature(gr.Chatbot.__init__).parameters
    kw = {"type": "messages"} if "type" in params else {}
    if "feedback_options" in params:
        kw["feedback_options"] = None
    return kw


def _session(sess) -> Session:
    return sess if isinstance(sess, Session) else Session()


def build_app(config: DemoConfig | None = None, demo: Demo | None = None):
    """Build the Gradio Blocks. Uploads go to `config.upload_dir` (a fresh temporary folder if
    None); `app.mmkv_uploads.remove()` deletes it (done by `launch()` on exit). `app.launch()`
    applies `config.max_upload` as Gradio's `max_file_size` unless given a smaller one."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    config = config or DemoConfig()
    demo = demo or Demo(config)
    uploads = UploadDir(config.upload_dir)
    # Gradio stores uploads (and files it serves) under GRADIO_TEMP_DIR, read when the Blocks and
    # its server are created: point it at our folder so no upload is written anywhere else
    # (close() points it back, so an app built earlier in the same process keeps working).
    previous_temp_dir = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = uploads.path

    import gradio as gr

    def thumbs_dir(sess: Session) -> str:
        return uploads.own("mmkv-thumbs", sess.id)

    def release(sess):
        """A tab's session expired or was closed: its encoding, its claim on its upload, its thumbnails go."""
        if isinstance(sess, Session):
            sess.cancel("the session ended")
            demo.drop(sess.eid)
            uploads.release(sess.id)
            shutil.rmtree(thumbs_dir(sess), ignore_errors=True)

    def warn(msg: str):
        try:
            gr.Warning(msg)
        except Exception:  # noqa: BLE001 - outside a request (tests): the status box still shows it
            pass

    recipes = recipe_choices()
    default_recipe = config.recipe if config.recipe else "none"
    note = model_note(config.models[0])
    prefill = sample_question() if note else ""

    with gr.Blocks(title="mmkv demo", analytics_enabled=False) as app:
        gr.HTML(f"<style>{CSS}</style>")
        gr.Markdown(INTRO)
        model_info = gr.Markdown(note, elem_id="mmkv-model-note", visible=bool(note))
        state = gr.State(Session(), time_to_live=config.session_ttl, delete_callback=release)
        with gr.Row():
            with gr.Column(scale=5, min_width=300):
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
                    # no minimum here: the demo's own check names the problem in the status box
                    fps = gr.Number(config.fps, label="fps (0 = uniform frames)", elem_id="mmkv-fps")
                max_new = gr.Slider(1, config.max_new_tokens, value=min(64, config.max_new_tokens), step=1,
                                    label="Max new tokens", info="answers also end at the model's stop tokens",
                                    elem_id="mmkv-max-new")
                encode_btn = gr.Button("Encode video", elem_id="mmkv-encode")
                status = gr.HTML(status_html("Upload a video to start."), elem_id="mmkv-status", min_height=64)
                with gr.Accordion("Presets and stages", open=False):
                    gr.HTML(_recipes_html())
            with gr.Column(scale=6, min_width=300):
                chat = gr.Chatbot(label="Chat", elem_id="mmkv-chat", height=420, **_chatbot_kwargs(gr))
                with gr.Row():
                    question = gr.Textbox(prefill, placeholder="Ask about the video…", show_label=False, scale=5,
                                          elem_id="mmkv-question", lines=1, max_lines=6)
                    ask_btn = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="mmkv-ask")
                new_chat = gr.Button("New chat (keep the encoding)", size="sm", elem_id="mmkv-new-chat")
        gallery = gr.Gallery(label=GALLERY_LABEL.format(one="frame"), elem_id="mmkv-thumbs", columns=6,
                             object_fit="contain", preview=False)
        with gr.Row():
            with gr.Column(min_width=300):
                tokens_box = gr.HTML(elem_id="mmkv-tokens-box")
            with gr.Column(min_width=300):
                memory_box = gr.HTML(elem_id="mmkv-memory-box")
        with gr.Row():
            with gr.Column(min_width=300):
                layers_box = gr.HTML(elem_id="mmkv-layers-box")
            with gr.Column(min_width=300):
                time_box = gr.HTML(elem_id="mmkv-time-box")
        with gr.Accordion("All stats of the last answer", open=False):
            stats_df = gr.Dataframe(headers=["stat", "value"], elem_id="mmkv-stats", interactive=False, wrap=True)

        outputs_reset = [chat, gallery, tokens_box, memory_box, layers_box, time_box, stats_df]

        def _cleared(sess):
            return {chat: sess.chat(), gallery: None, tokens_box: "", memory_box: "", layers_box: "", time_box: "",
                    stats_df: None}

        def ready_text(sess: Session) -> str:
            if sess.activity:
                return f"Working: {sess.activity}."
            if sess.video:
                return (f"Ready: {sess.info}. Ask a question: the video is encoded first (once), then every "
                        "question reuses the encoding.")
            return "Upload a video to start."

        # ------------------------------------------------------------ uploads
        def reject(path, sess, msg):
            """Show the error, delete the rejected file, put the session's previous video back."""
            warn(msg)
            if path and uploads.contains(path):
                uploads.discard(path)
            keep = sess.video if sess.video and os.path.isfile(sess.video) else None
            tail = f" Still using {sess.name!r}." if sess.video else ""
            return {video: keep, status: status_html(msg + tail, error=True), state: sess}

        def set_video(path, sess, name=None):
            sess = _session(sess)
            try:
                info = check_upload(path, config, name=name)
            except InputError as e:
                return reject(path, sess, f"upload rejected: {e}")
            except Exception as e:  # noqa: BLE001 - never let a bad file take the app down
                log.exception("upload check failed")
                shown = name or os.path.basename(path or "")
                return reject(path, sess, f"upload rejected: {user_message(e, {path: shown})}")
            uploads.release(sess.id)
            uploads.claim(info.path, sess.id)
            sess.cancel("another video was uploaded")
            sess.clear_chat()
            demo.drop(sess.eid)
            shutil.rmtree(thumbs_dir(sess), ignore_errors=True)
            sess.video, sess.name, sess.info, sess.eid, sess.key = info.path, info.name, info.describe(), None, None
            out = _cleared(sess)
            out.update({status: status_html(ready_text(sess)), state: sess})
            return out

        def on_upload(path, sess):
            return set_video(path, sess)

        def on_sample(sess):
            # a copy inside the upload folder: served like any upload, whatever the install location
            path = uploads.own("mmkv-sample", os.path.basename(SAMPLE_VIDEO))
            if not os.path.isfile(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copyfile(SAMPLE_VIDEO, path)
            out = set_video(path, sess)
            out[video] = path
            out[question] = sample_question()
            return out

        def on_clear(sess):
            sess = _session(sess)
            if sess.video:
                msg = (f"Video removed from the player. Questions still go to {sess.name!r} until you upload "
                       "another video.")
            else:
                msg = "Upload a video to start."
            return {status: status_html(msg), state: sess}

        def on_model(model_v):
            text = model_note(model_v) if model_v else ""
            return gr.update(value=text, visible=bool(text))

        # ------------------------------------------------------------ asking
        def reset_status(sess):
            """First step of every ask / encode: the status box says where things stand, no stale error."""
            return status_html(ready_text(_session(sess)))

        def settings(sess, model_v, recipe_v, frames_v, fps_v, max_new_v) -> Settings:
            """The settings of a new job, checked now (cheap) so a bad one is refused before it queues."""
            from ..recipe import Recipe

            if not sess.video:
                raise InputError("no video yet: upload a video (or use the bundled sample) first")
            frames_n, fps_f = demo.check_frames(frames_v, fps_v)
            model_n = demo.check_model(model_v)
            Recipe.parse((recipe_v or "").strip() or "none")
            try:
                n_new = int(max_new_v)
            except (TypeError, ValueError):
                raise InputError(f"max new tokens must be a whole number, got {max_new_v!r}") from None
            if not 1 <= n_new <= config.max_new_tokens:
                raise InputError(f"max new tokens must be between 1 and {config.max_new_tokens}, got {n_new}")
            return Settings(sess.video, sess.name, model_n, (recipe_v or "").strip() or "none", frames_n, fps_f,
                            n_new)

        def refused(e, sess):
            if not isinstance(e, MmkvError):
                log.exception("request refused")
            msg = user_message(e, {sess.video or "": sess.name or ""})
            warn(msg)
            return {status: status_html(msg, error=True), state: sess}

        def ask(q, sess, model_v, recipe_v, frames_v, fps_v, max_new_v):
            """Show the question in the chat at once and queue it (the `answer` step runs it)."""
            sess = _session(sess)
            try:
                if not isinstance(q, str) or not q.strip():
                    raise InputError("the question is empty; type a question about the video")
                job_settings = settings(sess, model_v, recipe_v, frames_v, fps_v, max_new_v)
            except Exception as e:  # noqa: BLE001 - shown in the page; the question stays in the box
                return refused(e, sess)
            sess.ask(q.strip(), job_settings)
            return {chat: sess.chat(), question: "", state: sess,
                    status: status_html(f"Question queued (now: {sess.activity})." if sess.activity else
                                        f"Question about {sess.name} queued.")}

        def encode(sess, model_v, recipe_v, frames_v, fps_v, max_new_v):
            sess = _session(sess)
            try:
                job_settings = settings(sess, model_v, recipe_v, frames_v, fps_v, max_new_v)
            except Exception as e:  # noqa: BLE001
                return refused(e, sess)
            sess.encode(job_settings)
            return {status: status_html(f"Encoding of {sess.name} queued."), state: sess}

        def answer(sess):
            """Run the session's oldest queued job; its progress and answer go into the chat."""
            sess = _session(sess)
            with sess.busy:
                job = sess.next_job()
                if job is None:  # already run by an earlier call, or cancelled
                    yield {status: gr.skip()}
                    return
                last, streaming = 0.0, False
                for kind, value in run_job(demo, sess, job):
                    if kind in ("progress", "text"):
                        # every encode / prefill step is shown; once text streams, a few updates a second
                        streaming = streaming or kind == "text"
                        now = time.monotonic()
                        if streaming and now - last < 0.15:
                            continue
                        last = now
                        out = {chat: sess.chat()}
                        if kind == "progress":
                            out[status] = status_html(value)
                        yield out
                    elif kind == "encoded":
                        enc, pipe, seconds = value
                        items = save_thumbnails(thumbnails(enc, config.thumbnails), thumbs_dir(sess), sess.eid)
                        one, _ = slot_words(enc)
                        yield {chat: sess.chat(), tokens_box: tokens_html(enc.stats, enc),
                               gallery: gr.update(value=items, label=GALLERY_LABEL.format(one=one)),
                               status: status_html(encoded_text(enc, job.settings.name, seconds, pipe.note))}
                    elif kind == "result":
                        res, enc = value
                        s = res.stats
                        yield {chat: sess.chat(), status: status_html(answered_text(res, job.settings.name)),
                               memory_box: memory_html(s), layers_box: layers_html(s),
                               time_box: timing_html(s, enc.stats.encode_s), tokens_box: tokens_html(s, enc),
                               stats_df: stats_rows(s)}
                    else:
                        msg, err = value
                        if not isinstance(err, InputError):
                            log.error("job failed", exc_info=err)
                        warn(msg)
                        yield {chat: sess.chat(), status: status_html(msg, error=True)}

        def on_new_chat(sess):
            sess = _session(sess)
            sess.clear_chat()
            return {chat: [], state: sess}

        # ------------------------------------------------------------ events
        upload_outs = [video, status, state, question] + outputs_reset
        video.upload(on_upload, [video, state], upload_outs, concurrency_limit=4, concurrency_id="io",
                     show_progress="minimal", api_name="upload")
        video.clear(on_clear, [state], [status, state], concurrency_limit=4, concurrency_id="io",
                    api_visibility="private")
        sample_btn.click(on_sample, [state], upload_outs, concurrency_limit=4, concurrency_id="io",
                         api_name="sample")
        model.change(on_model, [model], [model_info], queue=False, api_visibility="private")
        settings_in = [state, model, recipe, frames, fps, max_new]
        answer_outs = [chat, status, gallery, tokens_box, memory_box, layers_box, time_box, stats_df]
        triggers = [(ask_btn.click, ask, [question] + settings_in, [chat, status, question, state], "ask"),
                    (question.submit, ask, [question] + settings_in, [chat, status, question, state], None),
                    (encode_btn.click, encode, settings_in, [status, state], "encode")]
        for trigger, fn, ins, outs, name in triggers:
            private = {"api_visibility": "private"} if name is None else {"api_name": name}
            trigger(reset_status, [state], [status], queue=False, show_progress="hidden", trigger_mode="multiple",
                    api_visibility="private") \
                .then(fn, ins, outs, queue=False, show_progress="hidden", trigger_mode="multiple", **private) \
                .success(answer, [state], answer_outs, concurrency_id="model", concurrency_limit=config.concurrency,
                         trigger_mode="multiple", show_progress="minimal", show_progress_on=[status],
                         **({"api_visibility": "private"} if name != "ask" else {"api_name": "answer"}))
        new_chat.click(on_new_chat, [state], [chat, state], queue=False, api_visibility="private")

    app.queue(default_concurrency_limit=config.concurrency, max_size=config.queue_size)
    app.mmkv_config, app.mmkv_demo, app.mmkv_uploads = config, demo, uploads
    app.mmkv_previous_temp_dir = previous_temp_dir
    app.mmkv_sweeper = Sweeper(uploads, config.upload_ttl, config.unclaimed_ttl)
    _limit_uploads(app, config.max_upload_bytes)
    return app


def _limit_uploads(app, limit: int | None) -> None:
    """Make `app.launch()` pass the demo's upload limit as Gradio's `max_file_size` (Gradio's own
    default is no limit), or the smaller of the two when the caller gives one; the upload
    endpoint then refuses bigger files (HTTP 413) before storing them."""
    if limit is None:
        return
    launch = app.launch

    def limited_launch(*args, max_file_size=None, **kwargs):
        from gradio.utils import _parse_file_size

        given = _parse_file_size(max_file_size)
        return launch(*args, max_file_size=limit if given is None else min(given, limit), **kwargs)

    limited_launch.__doc__ = launch.__doc__
    app.launch = limited_launch


def launch(config: DemoConfig | None = None, *, host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, block: bool = True, demo: Demo | None = None, **launch_kwargs):
    """Build and serve the app. With block=False returns the app (call `close(app)` to stop it and
    delete its uploads); with block=True serves until interrupted, then cleans up."""
    app = build_app(config, demo)
    app.mmkv_sweeper.start()
    try:
        app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, show_error=True,
                   **launch_kwargs)
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
        if os.environ.get("GRADIO_TEMP_DIR") == app.mmkv_uploads.path:
            previous = getattr(app, "mmkv_previous_temp_dir", None)
            if previous is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = previous


__all__ = ["build_app", "launch", "close", "DemoConfig"]
