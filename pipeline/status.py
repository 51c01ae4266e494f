"""``pipeline status``: for every stage of a dataset, done / stale (and what changed) / not run (a
configuration that never ran: how it differs from the closest earlier run) / missing.

What changed is found by comparing the key material of the current plan with the ``inputs`` of the
stage's earlier manifests for the dataset (the closest one: fewest differences): which param, which
code file, which upstream, which input file. A stage pinned by ``version`` stays done when its source
drifts; status says so.
"""

from __future__ import annotations

from typing import Any

from pipeline.datasets import Dataset
from pipeline.runner import Override, Planner, StageState, Workspace

_SHOW_IDS = 5


def explain(ws: Workspace, dataset: Dataset, sets: list[Override] = ()) -> list[dict]:
    planner = Planner(ws, dataset, sets)
    states = planner.plan_all(ws.graph.for_task(dataset.task))
    rows: dict[str, dict] = {}
    for name, st in states.items():
        rows[name] = _describe(ws, dataset, st)
        # a configuration that never ran is "not run", and so is everything downstream of it
        if rows[name]["state"] == "stale" and any(rows[n]["state"] == "not run" for n in ws.graph[name].needs
                                                  if n in rows):
            rows[name]["state"] = "not run"
    return list(rows.values())


def _describe(ws: Workspace, dataset: Dataset, st: StageState) -> dict:
    out: dict[str, Any] = {"stage": st.name, "state": st.state, "key": st.key,
                           "dir": str(st.dir) if st.dir else None, "reasons": list(st.reasons)}
    if st.inputs or st.records:
        out["items"] = {"total": len(st.inputs) or len(st.records), "done": len(st.records), "todo": len(st.todo)}
    if st.state in ("blocked", "unknown", "imported"):
        return out
    if st.state == "done":
        manifest = ws.cache.read_manifest(st.dir) or {}
        version = ws.graph[st.name].version
        drift = _file_changes(manifest.get("code_files") or {}, st.code_files)
        if version is not None and drift:
            out["reasons"].append(f"source drifted since this output was made (version {version} pinned): "
                                  + ", ".join(drift))
        return out
    if st.state == "incomplete":
        ids = [it.id for it in st.todo]
        shown = ", ".join(ids[:_SHOW_IDS]) + (", ..." if len(ids) > _SHOW_IDS else "")
        out["reasons"].append(f"{len(ids)} of {len(st.inputs)} items missing or changed: {shown}")
        return out
    # explain against the closest earlier output: the one that differs in the fewest fields
    explanations = [changes(m.get("inputs") or {}, m.get("code_files") or {}, st)
                    for m in ws.cache.manifests(st.name, dataset.name)]
    if explanations:
        closest = min(explanations, key=len) or [("inputs", "inputs differ from the last output")]
        # other params than any earlier output: this configuration never ran (stale is for a configuration
        # that ran and whose code or inputs changed since)
        never = any(kind == "param" for kind, _ in closest)
        out["state"] = "not run" if never else "stale"
        out["reasons"] += [("closest earlier run: " if never else "") + text for _, text in closest]
    elif ws.cache.partial_dir(st.name, st.key).exists():
        out["reasons"].append("interrupted: a partial output exists and will be resumed")
    return out


def changes(old: dict, old_code: dict, st: StageState) -> list[tuple[str, str]]:
    """(kind, human-readable text) of each difference between a manifest's key material and the current
    one; kind is param, file, code, upstream or dataset."""
    new = st.material
    out = []
    old_p, new_p = _flatten(old.get("params") or {}), _flatten(new.get("params") or {})
    for path in sorted(set(old_p) | set(new_p)):
        a, b = old_p.get(path, "<unset>"), new_p.get(path, "<unset>")
        if a != b:
            if path.endswith(".file_fingerprint") and "<unset>" not in (a, b):
                out.append(("file", f"file {st.name}.{path[: -len('.file_fingerprint')]} changed"))
            else:
                out.append(("param", f"param {st.name}.{path}: {a!r} -> {b!r}"))
    old_c, new_c = old.get("code") or {}, new.get("code") or {}
    if old_c.get("version") != new_c.get("version"):
        out.append(("code", f"version {old_c.get('version')} -> {new_c.get('version')}"))
    elif old_c != new_c:
        out += [("code", c) for c in _file_changes(old_code, st.code_files) or ["code changed"]]
    for need, up in (new.get("upstream") or {}).items():
        before = (old.get("upstream") or {}).get(need) or {}
        if before.get("key") != up.get("key"):
            out.append(("upstream", f"upstream {need} changed (key {before.get('key')} -> {up.get('key')})"))
        elif before.get("records") != up.get("records"):
            out.append(("upstream", f"upstream {need}: item records changed"))
    old_d, new_d = old.get("dataset") or {}, new.get("dataset") or {}
    for k in sorted(set(old_d) | set(new_d)):
        if old_d.get(k) != new_d.get(k):
            out.append(("dataset", f"dataset {k} changed"))
    return out


def _file_changes(old: dict, new: dict) -> list[str]:
    out = []
    for f in sorted(set(old) | set(new)):
        if f not in old:
            out.append(f"code file added: {f}")
        elif f not in new:
            out.append(f"code file removed: {f}")
        elif old[f] != new[f]:
            out.append(f"code file changed: {f}")
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def format_text(dataset: Dataset, rows: list[dict]) -> str:
    lines = [f"dataset {dataset.name} ({dataset.task}): {dataset.path}"]
    width = max(len(r["stage"]) for r in rows) if rows else 8
    for r in rows:
        items = r.get("items")
        count = f"{items['done']}/{items['total']} items" if items else ""
        key = (r["key"] or "-")[:12]
        head = f"  {r['stage']:<{width}}  {r['state']:<10}  {key:<12}  {count}".rstrip()
        lines.append(head)
        lines += [f"  {'':<{width}}    - {reason}" for reason in r["reasons"]]
    return "\n".join(lines)
