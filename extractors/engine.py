"""The extraction engine: decode workers feed batched inference; a writer thread stores results.

What is extracted is declared by the caller, not built in: each task is one video and the records
(items) cut from it; its sampler (``extractors.samplers``) says which frames and clips each record
needs, and the output (``extractors.outputs``) what the model gives per clip and how a record is
assembled (``extract``: one (T, C) matrix per video over a clip grid; ``extract_keyframes``: a map and
context tokens per keyframe, one centred clip each, all keyframes of a video from one decode pass).

- Decoding runs in ``workers`` processes (forked; each opens its own reader per video). Each sends
  the sampled frames of its current video, in chunks, through its own pipe, at most a few chunks
  ahead (backpressure keeps memory flat when inference is the bottleneck).
- The main process transforms each frame once on the device (``StreamFrames``: the preset's
  preprocessing, plus optical flow for a flow stream, each consecutive pair once per video), slices
  the overlapping clip windows out of a per-video frame buffer (``ClipWindows``) and runs the model on
  batches that mix videos.
  On CUDA: pinned host memory, non-blocking copies, bf16/fp16 autocast, and the batch halves when
  it does not fit.
- A finished record goes to a writer thread (``on_done``: store write, then the completion record),
  off the critical path, as soon as its last clip is through the model.
- A worker that sends nothing for ``video_timeout_s`` of waiting (a decoder that hangs) or dies (decord aborts
  the process on some corrupt H.264, decord #25) is replaced; its video fails with kind ``timeout``
  or ``decoder_crash`` (a crash under decord is retried once with PyAV). Every other failure of a
  video (each of its records not written yet) or of one record (a keyframe outside its video) is
  reported through ``on_failed`` and the run goes on.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from extractors.clip_sampling import ClipWindows
from extractors.decoding import DecodeError, DecodeSpec, VideoMeta, decode_video
from extractors.flow import FlowComputer, StreamFrames
from extractors.outputs import ClipVectors
from extractors.preprocess import FramePreprocessor
from extractors.presets import Preset
from extractors.samplers import ClipPlan, GridSampler
from pipeline.context import Item
from pipeline.errors import describe_error

# Frame chunks in flight between decode workers and the main process, per worker.
_CHUNKS_PER_WORKER = 8
# Videos queued per worker: the next one is opened while the main process still works on the last.
_VIDEOS_PER_WORKER = 2
_POLL_S = 0.05


@dataclass(frozen=True)
class EngineConfig:
    device: torch.device
    batch_size: int = 8
    workers: int = 1              # decode processes; 0 decodes inline (no timeout protection)
    video_timeout_s: float = 600.0
    amp: bool = True              # autocast on CUDA (bf16 where supported, else fp16)


@dataclass
class EngineStats:
    done: int = 0
    failed: int = 0
    clips: int = 0
    native_frames: int = 0        # frames of the videos (native, by timestamp)
    decoded_frames: int = 0       # native frames the decoders went through
    decode_s: float = 0.0         # main process time spent waiting for frames
    infer_s: float = 0.0
    flow_pairs: int = 0           # optical-flow computations (consecutive frame pairs)
    flow_s: float = 0.0           # main process time spent computing flow
    seconds: float = 0.0
    decoders: dict = field(default_factory=dict)


OnDone = Callable[[Item, Any, VideoMeta, float], None]
OnFailed = Callable[[Item, str, str], None]


@dataclass(frozen=True)
class Task:
    """One video to decode and the records cut from it; ``sampler`` None: the spec's clip grid."""

    path: Path
    items: tuple[Item, ...]
    sampler: Any = None


class _Video:
    """Main-process state of one video being extracted."""

    def __init__(self, index: int, task: Task, meta: VideoMeta, plan: ClipPlan, started: float, held):
        self.index = index
        self.held = held                  # the frame transform's state for this video
        self.task = task
        self.meta = meta
        self.plan = plan
        self.windows = ClipWindows(plan)
        self.frames: torch.Tensor | None = None
        self.base = 0
        self.received = 0
        # Per record: its clips still to come, and the rows of its clips already through the model,
        # held only until the record is written.
        self.left = np.bincount(plan.owners, minlength=len(task.items))
        order = np.argsort(plan.owners, kind="stable")
        self.slot = np.empty(plan.n_clips, dtype=np.int64)
        self.slot[order] = np.arange(plan.n_clips) - np.searchsorted(plan.owners[order], plan.owners[order])
        self.rows: dict[int, dict[str, np.ndarray]] = {}
        self.decoded = False
        self.dead = False
        self.started = started


class _Workers:
    """Decode processes, one video at a time each. Each answers on its own pipe: a process that dies
    mid-message (decord aborts on some corrupt files) can only break its own pipe, which is replaced
    with it, never a lock or a stream the other workers share."""

    def __init__(self, n: int, spec: DecodeSpec):
        self.ctx = mp.get_context("fork")
        self.spec = spec
        self.procs: list = [None] * n
        self.tasks: list = [None] * n
        self.conns: list = [None] * n
        # The video each worker is decoding, in shared memory: it outlives a worker that dies, whose
        # buffered messages do not.
        self.current: list = [None] * n
        self.held: list[list] = [[] for _ in range(n)]   # (video index, decoders) queued per worker, in order
        # Seconds each busy worker stayed silent while this process was waiting for frames. Time spent
        # in inference does not count: a worker blocked on a full pipe then is not hung.
        self.silent = [0.0] * n
        for w in range(n):
            self._start(w)

    def _start(self, w: int) -> None:
        self.tasks[w] = self.ctx.SimpleQueue()
        receive, send = self.ctx.Pipe(duplex=False)
        self.current[w] = self.ctx.Value("q", -1, lock=False)
        self.procs[w] = self.ctx.Process(target=_start_worker,
                                         args=(os.getpid(), self.tasks[w], send, self.current[w], self.spec),
                                         daemon=True, name=f"decode-{w}")
        self.procs[w].start()
        send.close()                      # the child's end: EOF here once the child is gone
        self.conns[w] = receive
        self.held[w] = []

    def open_slots(self) -> list[int]:
        return [w for w, h in enumerate(self.held) if len(h) < _VIDEOS_PER_WORKER]

    def busy(self) -> bool:
        return any(self.held)

    def submit(self, w: int, index: int, path: str, decoders: tuple[str, ...], sampler) -> None:
        if not self.held[w]:
            self.silent[w] = 0.0
        self.held[w].append((index, decoders))
        self.tasks[w].put((index, path, decoders, sampler))

    def release(self, w: int, index: int) -> None:
        self.held[w] = [h for h in self.held[w] if h[0] != index]
        self.silent[w] = 0.0

    def receive(self, timeout: float) -> list[tuple[int, tuple | None]]:
        """(worker, message) for every worker with something to say; message None: its pipe broke."""
        from multiprocessing.connection import wait

        t0 = time.monotonic()
        ready = wait(self.conns, timeout)
        waited = time.monotonic() - t0
        out = []
        for w, conn in enumerate(self.conns):
            if conn in ready:
                self.silent[w] = 0.0
                try:
                    out.append((w, conn.recv()))
                except (EOFError, OSError, pickle.UnpicklingError):
                    out.append((w, None))
            elif self.held[w]:
                self.silent[w] += waited
        return out

    def leftovers(self, w: int) -> list[tuple]:
        """Messages still in the pipe of a worker that is dead or about to be killed."""
        out = []
        try:
            while self.conns[w].poll():
                out.append(self.conns[w].recv())
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        return out

    def replace(self, w: int) -> None:
        """Kill a hung or dead worker and start a fresh one in its place."""
        self._stop(w)
        self._start(w)

    def _stop(self, w: int) -> None:
        proc = self.procs[w]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        self.conns[w].close()

    def close(self) -> None:
        for w in range(len(self.procs)):
            self._stop(w)


def _start_worker(driver: int, *args) -> None:
    """A decode process ends with its driver (killed or not), never lingering as an orphan."""
    from pipeline.lifetime import die_with_parent

    die_with_parent(driver)
    _decode_worker(*args)


def _decode_worker(tasks, conn, current, spec: DecodeSpec) -> None:
    """Decode process: videos from ``tasks``; events through a bounded buffer and a sender thread,
    so decoding runs ahead of the main process by a few chunks and no further."""
    outbox: queue.Queue = queue.Queue(maxsize=_CHUNKS_PER_WORKER)

    def sender() -> None:
        while True:
            conn.send(outbox.get())

    # Runs until the engine kills the process (idle by then, or hung, or no longer wanted).
    threading.Thread(target=sender, daemon=True).start()
    while True:
        index, path, decoders, sampler = tasks.get()
        current.value = index
        try:
            for event in decode_video(path, dataclasses.replace(spec, decoders=decoders), sampler):
                outbox.put((index,) + event)
        except DecodeError as e:
            outbox.put((index, "error", e.kind, str(e)))
        except Exception as e:  # anything else in a decoder is this video's failure, not the run's
            outbox.put((index, "error", "decode_error", f"{type(e).__name__}: {e}"))
        current.value = -1
        outbox.put((index, "released"))


class Engine:
    """Runs one model over many videos; see the module docstring for the data flow."""

    def __init__(self, model: torch.nn.Module, preset: Preset, spec: DecodeSpec, config: EngineConfig,
                 output=None, flow: FlowComputer | None = None):
        self.model = model.eval().to(config.device)
        self.preset = preset
        self.spec = spec
        self.config = config
        self.output = output or ClipVectors()
        self.sampler = GridSampler(spec.grid, spec.tail)
        self.batch_size = max(1, int(config.batch_size))
        self.autocast = None
        frames_dtype = torch.float32
        if config.device.type == "cuda" and config.amp:
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.autocast = lambda: torch.autocast("cuda", dtype=amp)
            frames_dtype = amp              # the frame buffer in the autocast dtype: half the memory
        self.prep = FramePreprocessor(preset, config.device, frames_dtype)
        self.flow = flow
        self.frames = StreamFrames(self.prep, preset.streams, flow, preset.crop)

    # -- public ---------------------------------------------------------------------------------
    def run(self, tasks: Sequence[Task | Item], on_done: OnDone, on_failed: OnFailed, bar=None) -> EngineStats:
        """Extract every task (an Item alone: one video, one record over the spec's clip grid)."""
        self.tasks = [t if isinstance(t, Task) else Task(t.path, (t,)) for t in tasks]
        if self.flow is not None and any(t.sampler is not None for t in self.tasks):
            raise ValueError("optical flow needs consecutive frames: the clip grid of extract, not a task's sampler")
        self.on_failed_cb = on_failed
        self.bar = bar
        self.stats = EngineStats()
        self.videos: dict[int, _Video] = {}
        self.pending: list[tuple[_Video, int, torch.Tensor]] = []
        self.n_pending = 0
        self.failed_ids: set[int] = set()
        self.completed: set[int] = set()
        self.resolved: set[tuple[int, int]] = set()   # (task, record) written or failed
        self.writes: queue.Queue = queue.Queue(maxsize=4)
        self.write_errors: queue.Queue = queue.Queue()
        writer = threading.Thread(target=self._writer, args=(on_done,), daemon=True, name="feature-writer")
        writer.start()
        t0 = self.t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                if self.config.workers > 0:
                    self._run_workers()
                else:
                    self._run_inline()
        finally:
            self.writes.put(None)
            writer.join()
        self._drain_write_errors()
        if self.flow is not None:
            self.stats.flow_pairs, self.stats.flow_s = self.flow.pairs, self.flow.seconds
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    # -- drivers --------------------------------------------------------------------------------
    def _run_inline(self) -> None:
        for index, task in enumerate(self.tasks):
            try:
                for event in decode_video(str(task.path), self.spec, self._sampler(index)):
                    self._on_event(index, event)
            except DecodeError as e:
                self._fail(index, e.kind, str(e))
            self._flush(force=True)
            self._drain_write_errors()

    def _run_workers(self) -> None:
        n = min(self.config.workers, max(1, len(self.tasks)))
        workers = _Workers(n, self.spec)
        todo = list(range(len(self.tasks)))[::-1]
        try:
            while todo or workers.busy():
                for w in workers.open_slots():
                    if todo:
                        index = todo.pop()
                        self._submit(workers, w, index, self.spec.decoders)
                t_wait = time.perf_counter()
                messages = workers.receive(_POLL_S if not self.pending else 0.0)
                self.stats.decode_s += time.perf_counter() - t_wait
                for w, msg in messages:
                    if msg is not None:          # None, a broken pipe: _check_workers sees the dead process
                        self._on_message(workers, w, msg)
                # Full batches while frames arrive; whatever is pending when nothing does.
                self._flush(force=not messages)
                self._drain_write_errors()
                self._check_workers(workers)
            self._flush(force=True)
        finally:
            workers.close()

    def _sampler(self, index: int):
        return self.tasks[index].sampler or self.sampler

    def _submit(self, workers: _Workers, w: int, index: int, decoders: tuple[str, ...]) -> None:
        workers.submit(w, index, str(self.tasks[index].path), decoders, self._sampler(index))

    def _on_message(self, workers: _Workers, w: int, msg: tuple) -> None:
        index, kind = msg[0], msg[1]
        if kind == "released":
            workers.release(w, index)
        elif kind == "error":
            self._fail(index, msg[2], msg[3])
        else:
            self._on_event(index, msg[1:])

    def _check_workers(self, workers: _Workers) -> None:
        for w in range(len(workers.held)):
            if not workers.held[w]:
                continue
            workers.procs[w].join(timeout=0)
            if workers.procs[w].is_alive() and workers.silent[w] <= self.config.video_timeout_s:
                continue
            for msg in workers.leftovers(w):    # what it said before it died
                self._on_message(workers, w, msg)
            held = {i: d for i, d in workers.held[w] if i not in self.completed}
            if not held:
                workers.replace(w)
                continue
            culprit = workers.current[w].value
            if culprit not in held:
                culprit = next(iter(held))
            decoders = held.pop(culprit)
            code = workers.procs[w].exitcode
            workers.replace(w)
            if code is None:
                self._fail(culprit, "timeout", f"the decoder made no progress for {self.config.video_timeout_s:g} s")
            elif decoders != ("pyav",) and "pyav" in decoders:
                # decord aborted the process (decord #25): this video starts over with PyAV alone.
                self._reset(culprit)
                self._submit(workers, w, culprit, ("pyav",))
            else:
                self._fail(culprit, "decoder_crash", f"the decoder process died (exit code {code})")
            # The others may have been decoded already, but what they sent died with the process.
            for index, video_decoders in held.items():
                self._reset(index)
                self._submit(workers, w, index, video_decoders)

    # -- events ---------------------------------------------------------------------------------
    def _on_event(self, index: int, event: tuple) -> None:
        kind = event[0]
        if index in self.failed_ids or index in self.completed:
            return
        if kind == "meta":
            meta, plan = event[1], event[2]
            task = self.tasks[index]
            self.videos[index] = _Video(index, task, meta, plan, time.perf_counter(), self.frames.begin())
            for record, (why, message) in plan.failed.items():
                self._fail_record(index, record, why, message)
            if self.bar is not None:
                self.bar.set_postfix_str(f"{task.path.stem}", refresh=False)
            return
        video = self.videos.get(index)
        if video is None:
            return  # left over from a decoder attempt that was abandoned (reset / crash retry)
        if kind == "frames":
            self._on_frames(video, event[2])
        elif kind == "done":
            tail = self.frames.end(video.held)
            if tail is not None:
                self._append(video, tail)
            video.decoded = True
            first, rows = video.windows.finish()
            self._queue_clips(video, first, rows)
            self._maybe_finish(video)
        elif kind == "reset":
            self._reset(index)

    def _reset(self, index: int) -> None:
        video = self.videos.pop(index, None)
        if video is not None:
            video.dead = True

    def _on_frames(self, video: _Video, frames: np.ndarray) -> None:
        self._append(video, self.frames.push(video.held, frames))
        first, rows = video.windows.ready(video.received)
        self._queue_clips(video, first, rows)
        keep = video.windows.keep_from()
        if keep > video.base:
            video.frames = video.frames[keep - video.base:]
            video.base = keep

    def _append(self, video: _Video, x: torch.Tensor) -> None:
        video.frames = x if video.frames is None else torch.cat([video.frames, x])
        video.received += len(x)

    def _queue_clips(self, video: _Video, first: int, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        local = torch.from_numpy(rows - video.base).to(video.frames.device)
        clips = video.frames[local].permute(0, 2, 1, 3, 4)       # (k, C, T, H, W)
        self.pending.append((video, first, clips))
        self.n_pending += len(rows)

    # -- inference ------------------------------------------------------------------------------
    def _flush(self, force: bool) -> None:
        while self.n_pending >= self.batch_size or (force and self.n_pending):
            batch, self.pending, self.n_pending = self._take(self.batch_size)
            self._infer(batch)

    def _take(self, n: int):
        taken, rest, count = [], [], 0
        for video, first, clips in self.pending:
            if count >= n:
                rest.append((video, first, clips))
                continue
            k = min(n - count, len(clips))
            taken.append((video, first, clips[:k]))
            if k < len(clips):
                rest.append((video, first + k, clips[k:]))
            count += k
        return taken, rest, sum(len(c) for _, _, c in rest)

    def _infer(self, batch: list) -> None:
        live = [(v, f, c) for v, f, c in batch if not v.dead]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            out = self._forward(torch.cat([c for _, _, c in live]))
        except Exception as e:
            if len({id(v) for v, _, _ in live}) > 1:
                # Find the video that breaks the model; the others in the batch go on.
                for group in _by_video(live):
                    self._infer(group)
                return
            video = live[0][0]
            self._fail(video.index, "model_error", f"{type(e).__name__}: {e}")
            return
        finally:
            self.stats.infer_s += time.perf_counter() - t0
        pos = 0
        for video, first, clips in live:
            k = len(clips)
            owners = video.plan.owners[first:first + k]
            for record in np.unique(owners):
                at = np.flatnonzero(owners == record)
                rows = video.rows.get(record)
                if rows is None:
                    n = int(np.count_nonzero(video.plan.owners == record))
                    rows = video.rows[record] = {name: np.empty((n,) + o.shape[1:], dtype=np.float32)
                                                 for name, o in out.items()}
                slots = video.slot[first + at]
                for name, o in out.items():
                    rows[name][slots] = o[pos + at]
                video.left[record] -= len(at)
                if video.left[record] == 0:
                    self._finish_record(video, int(record))
            pos += k
            self.stats.clips += k
        for video in {id(v): v for v, _, _ in live}.values():
            self._maybe_finish(video)

    def _forward(self, clips: torch.Tensor) -> dict[str, np.ndarray]:
        try:
            if self.autocast is not None:
                with self.autocast():
                    out = self.output.forward(self.model, clips)
            else:
                out = self.output.forward(self.model, clips)
        except torch.OutOfMemoryError:
            if len(clips) == 1:
                raise
            # The batch did not fit: halve it for the rest of the run.
            torch.cuda.empty_cache()
            self.batch_size = max(1, len(clips) // 2)
            parts = [self._forward(part) for part in clips.split(self.batch_size)]
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        for name, o in out.items():
            if o.shape[0] != len(clips):
                raise RuntimeError(f"backbone returned {name} of shape {tuple(o.shape)} for {len(clips)} clips")
        return {name: o.float().cpu().numpy() for name, o in out.items()}

    # -- completion -----------------------------------------------------------------------------
    def _finish_record(self, video: _Video, record: int) -> None:
        rows = video.rows.pop(record)
        if (video.index, record) in self.resolved:
            return        # written before its video restarted under another decoder
        self.resolved.add((video.index, record))
        item = video.task.items[record]
        self.writes.put((item, self.output.record(rows), video.meta, time.perf_counter() - video.started))
        self._advance(item.id)

    def _maybe_finish(self, video: _Video) -> None:
        if video.dead or not video.decoded or video.left.any():
            return
        del self.videos[video.index]
        self.completed.add(video.index)
        meta = video.meta
        self.stats.native_frames += meta.n_frames
        self.stats.decoded_frames += meta.n_native_decoded
        self.stats.decoders[meta.decoder] = self.stats.decoders.get(meta.decoder, 0) + 1

    def _writer(self, on_done: OnDone) -> None:
        while True:
            job = self.writes.get()
            if job is None:
                return
            item, feats, meta, seconds = job
            try:
                on_done(item, feats, meta, seconds)
            except Exception as e:
                self.write_errors.put((item, describe_error(e)))

    def _drain_write_errors(self) -> None:
        while True:
            try:
                item, message = self.write_errors.get_nowait()
            except queue.Empty:
                return
            self.stats.done -= 1
            self._report_failure(item, "write_error", message)

    def _fail(self, index: int, kind: str, message: str) -> None:
        """The whole video failed: each of its records not written yet fails with it."""
        if index in self.failed_ids:
            return
        video = self.videos.pop(index, None)
        if video is not None:
            video.dead = True
        self.failed_ids.add(index)
        for record in range(len(self.tasks[index].items)):
            self._fail_record(index, record, kind, message)

    def _fail_record(self, index: int, record: int, kind: str, message: str) -> None:
        if (index, record) in self.resolved:
            return
        self.resolved.add((index, record))
        self._report_failure(self.tasks[index].items[record], kind, message)

    def _report_failure(self, item: Item, kind: str, message: str) -> None:
        self.stats.failed += 1
        if self.bar is not None:
            self.bar.update(1)
        self.on_failed_cb(item, kind, message)

    def _advance(self, video_id: str) -> None:
        self.stats.done += 1
        if self.bar is not None:
            rate = self.stats.clips / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} clips/s {video_id}", refresh=False)
            self.bar.update(1)


def _by_video(batch: list) -> list[list]:
    groups: dict[int, list] = {}
    for entry in batch:
        groups.setdefault(id(entry[0]), []).append(entry)
    return list(groups.values())
