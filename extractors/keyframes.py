"""Stage entry ``extract_keyframes``: the keyframes of a detect dataset -> one keyframe store per stage key.

Items are keyframes (``per_item: keyframes``: id ``"<video>,<timestamp>"``, path the video file; see
``pipeline.keyframe_items``), so adding keyframes or videos extracts only those. The work runs through
the extraction engine of ``extract`` (decode workers, batched inference, writer thread, failures and
timeouts), declared differently:

- sampled: one clip centred on each keyframe (``KeyframeSampler``: the preset's ``clip_len`` frames at
  ``frame_interval``), every keyframe of a video cut from one forward decode pass;
- stored: per keyframe a ``map`` (C, H, W) averaged over time and ``context`` tokens (C, T) max-pooled
  over space (``KeyframeMaps``), float16 by default, one chunk each.

A keyframe whose centre lies outside its video fails alone (kind ``beyond_end``) and the run goes on.

Params: as ``extract`` (``preset``: ava_slowfast_r50 | ava_videomae | demo_ava, preset fields, ``weights``,
``store``, ``dtype``) plus ``compression`` (zarr: none | zstd | lz4). Store attributes: those of
``extract`` plus ``index: keyframe``, ``fields``, ``feature_stride`` (input pixels per map cell). Record
attributes: ``video``, ``timestamp``, ``time_s`` (seconds in the file), ``frame_height`` /
``frame_width`` (the network input), ``feature_stride``, the source fingerprint and the decoder. Read it with
``pipeline.store.loader.RecordReader``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from extractors.presets import Preset
from extractors.stage import run_stage
from pipeline.context import Item, StageContext


@dataclass(frozen=True)
class KeyframeRecords:
    """``extract_keyframes``' records: a map and context tokens per keyframe."""

    timestamp_offset_s: float = 0.0
    unit = "keyframe"

    def output(self, model):
        from extractors.outputs import KeyframeMaps

        return KeyframeMaps(model)

    def store_attrs(self, model) -> dict:
        from extractors.outputs import KeyframeMaps

        KeyframeMaps(model)  # a backbone without a map is refused before the store is made
        return {"index": KeyframeMaps.index, "fields": KeyframeMaps.fields,
                "feature_stride": int(model.feature_stride), "timestamp_offset_s": self.timestamp_offset_s}

    def tasks(self, items: Sequence[Item], preset: Preset) -> list:
        from extractors.engine import Task
        from extractors.samplers import KeyframeSampler

        by_video: dict = {}
        for item in items:
            by_video.setdefault(item.path, []).append(item)
        return [Task(path, tuple(group), KeyframeSampler(preset.clip_len, preset.frame_interval,
                                                          tuple(self.seconds(item) for item in group)))
                for path, group in by_video.items()]

    def seconds(self, item: Item) -> float:
        from pipeline.ava import parse_keyframe_id

        return parse_keyframe_id(item.id)[1] - self.timestamp_offset_s

    def shard_key(self, item: Item) -> str:
        return str(item.path)

    def write(self, store, item: Item, data, meta, seconds: float, preset: Preset) -> dict:
        from pipeline.ava import parse_keyframe_id

        video, timestamp = parse_keyframe_id(item.id)
        height, width = preset.crop or (meta.frame_height, meta.frame_width)
        attrs = {"video": video, "timestamp": timestamp, "time_s": self.seconds(item),
                 "frame_height": height, "frame_width": width, "feature_stride": store.attrs["feature_stride"],
                 "source_fingerprint": item.fingerprint,
                 "sampled_fps": meta.sampled_fps, "native_fps": meta.native_fps, "rotation": meta.rotation,
                 "decoder": meta.decoder,
                 "decoder_version": meta.decoder_version}
        store.write(item.id, data, attrs)
        return {"shapes": {name: list(arr.shape) for name, arr in data.items()}, "frame_size": [height, width],
                "decoder": meta.decoder, "fps": meta.sampled_fps}


def extract_keyframes(ctx: StageContext) -> dict:
    return run_stage(ctx, KeyframeRecords(float(ctx.dataset.ava.timestamp_offset_s)))
