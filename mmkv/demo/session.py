"""One browser tab's chat and queue of questions (`Session`), and running one queued job
(`run_job`), without Gradio.

A question is shown in the chat the moment it is asked, followed by a reply placeholder that
says what it waits for (the model, the video's encoding, the question before it). It waits in the
session's queue of jobs; `run_job` takes the oldest, encodes the video if the settings need a
new encoding (the placeholders show the encoding's progress), then streams the answer into the
placeholder. The "Encode video" button queues an encode job the same way, so a question asked
while a video encodes is answered when the encoding is done, on that encoding.

    sess = Session()
    job = sess.ask("What happens?", Settings("clip.mp4", "clip.mp4", "mmkv-tiny", "none", 32, 2.0, 64))
    for kind, value in run_job(demo, sess, sess.next_job()):
        ...    # ("progress", label), ("encoded", (enc, pipe, seconds)), ("text", delta), ("result", (res, enc)),
               # ("error", (message, exception)); sess.chat() is the chat to show after each
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from .uploads import user_message

WAIT = "⏳"


@dataclass(frozen=True)
class Settings:
    """What a question is asked with, fixed when it is asked (later changes do not move it)."""

    video: str
    name: str
    model: str
    recipe: str
    frames: int
    fps: float | None
    max_new_tokens: int


@dataclass
class Job:
    kind: str                       # "ask" or "encode"
    settings: Settings
    question: str = ""
    reply: dict | None = None       # the chat message the answer goes into (ask only)


class Session:
    """A browser tab: its video, its chat (messages-format dicts) and its queue of jobs.

    Gradio hands the same object to every event of the tab; handlers change it in place. Gradio
    deep-copies a State's initial value for each new tab: a copy is a new empty session."""

    def __init__(self):
        self.id = uuid.uuid4().hex
        self.video: str | None = None   # the accepted upload's server path
        self.name: str | None = None    # ... and the name the user knows it by
        self.info = ""                  # its one-line description
        self.eid: str | None = None     # its current encoding (in Demo's store)
        self.key: tuple | None = None   # ... and the settings it was made with
        self.history: list[dict] = []
        self.jobs: deque[Job] = deque()
        self.activity = ""              # what the running job does now, for the replies waiting behind it
        self.lock = threading.Lock()    # guards history and jobs
        self.busy = threading.Lock()    # held while a job of this session runs: one at a time, in order

    def __deepcopy__(self, memo):
        return Session()

    def chat(self) -> list[dict]:
        """The chat to show (a copy: a running job keeps writing into its own reply)."""
        with self.lock:
            return [dict(m) for m in self.history]

    def ask(self, question: str, settings: Settings) -> Job:
        """Show `question` in the chat with a placeholder reply, and queue it."""
        with self.lock:
            wait = f"{WAIT} waiting: {self.activity}" if self.activity else f"{WAIT} waiting for the model…"
            reply = {"role": "assistant", "content": wait}
            self.history += [{"role": "user", "content": question}, reply]
            job = Job("ask", settings, question, reply)
            self.jobs.append(job)
            return job

    def encode(self, settings: Settings) -> Job:
        with self.lock:
            job = Job("encode", settings)
            self.jobs.append(job)
            return job

    def next_job(self) -> Job | None:
        with self.lock:
            return self.jobs.popleft() if self.jobs else None

    def pending(self) -> int:
        with self.lock:
            return len(self.jobs)

    def cancel(self, reason: str) -> int:
        """Drop every queued job; their replies say why. Returns how many."""
        with self.lock:
            n = len(self.jobs)
            for job in self.jobs:
                if job.reply is not None:
                    job.reply["content"] = f"✗ not asked: {reason}"
            self.jobs.clear()
            return n

    def clear_chat(self) -> None:
        """A new chat: the messages and the questions still queued go; the encoding stays."""
        with self.lock:
            self.jobs.clear()
            self.history = []

    def show(self, job: Job, label: str, activity: str) -> None:
        """The running `job` is at `label`; the replies waiting behind it say `activity`."""
        with self.lock:
            self.activity = activity
            if job.reply is not None:
                job.reply["content"] = f"{WAIT} {label}"
            for i, other in enumerate(self.jobs):
                if other.reply is not None:
                    after = "" if i == 0 else f" ({i} more question{'s' if i > 1 else ''} before this one)"
                    other.reply["content"] = f"{WAIT} waiting: {activity}{after}"


def run_job(demo, sess: Session, job: Job) -> Iterator[tuple[str, object]]:
    """Run one job of `sess` with `demo` (a `Demo`): encode when the session has no encoding with
    the job's settings, then (for a question) stream the answer into the job's reply. Errors are
    not raised: they end in the reply and as ("error", (message, exception))."""
    s = job.settings
    answer = ""
    try:
        key = demo.settings_key(s.video, s.model, s.recipe, s.frames, s.fps)
        hit = demo.encoding(sess.eid, key) if sess.key == key else None
        if hit is None:
            t0 = time.perf_counter()
            eid = enc = None
            sess.show(job, f"encoding the video ({s.name})…", f"the video is being encoded ({s.name})")
            yield "progress", f"Encoding {s.name}…"
            for kind, value in demo.encode_stream(s.video, s.model, s.recipe, s.frames, s.fps, name=s.name):
                if kind == "progress":
                    label = value[1]
                    sess.show(job, f"encoding the video: {label}", f"the video is being encoded: {label}")
                    yield "progress", f"Encoding {s.name}: {label}"
                else:
                    eid, enc = value
            demo.drop(sess.eid)
            sess.eid, sess.key = eid, key
            enc, pipe = demo.encoding(eid)
            yield "encoded", (enc, pipe, time.perf_counter() - t0)
        else:
            enc, pipe = hit
        if job.kind != "ask":
            if hit is not None:
                yield "progress", f"{s.name} is already encoded with these settings."
            return
        sess.show(job, "answering…", "the question above is being answered")
        yield "progress", f"Answering about {s.name}…"
        for kind, value in demo.ask_stream(enc, pipe, job.question, max_new_tokens=s.max_new_tokens,
                                           progress_events=True):
            if kind == "progress":
                if not answer:
                    sess.show(job, value[1], "the question above is being answered")
                yield "progress", f"Answering about {s.name}: {value[1]}"
            elif kind == "text":
                answer += value
                job.reply["content"] = answer
                yield "text", value
            else:
                job.reply["content"] = value.text or "(empty answer)"
                yield "result", (value, enc)
    except Exception as e:  # noqa: BLE001 - shown in the page; the app keeps running
        msg = user_message(e, {s.video: s.name})
        if job.reply is not None:
            job.reply["content"] = (answer + "\n\n" if answer else "") + f"⚠ {msg}"
        yield "error", (msg, e)
    finally:
        with sess.lock:
            sess.activity = ""
