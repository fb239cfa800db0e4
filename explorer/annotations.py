"""A researcher's annotations of one feature's pathway graph, kept in the cache
(annotations/L12-3456.json, engine.schema.annotations_path): pinned nodes, supernodes
(named groups of nodes), free-text labels and notes per node.

The file has the shape engine/pathways/graph.py's circuit_tracer_json takes as its
`annotations` argument (pinned, supernodes [{name, members}], labels) plus notes and a
schema version; `circuit_tracer_annotations` is that adapter, and the Downloads tab passes it to
the engine's exporter (qParams.pinnedIds, qParams.supernodes, node clerp).

Suggested supernodes group nodes by co-attribution, computed from the graph's own edges (no
SAE decoder needed): within a layer, nodes whose signed edge profiles (the weights to and from
every other node) have cosine similarity >= a threshold, merged by average linkage.

No streamlit here: the page calls these functions; tests call them directly."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from engine import schema
from engine.errors import UserError

#: Node ids: our feature ids (L12-3456) and whatever other node kinds a graph may carry
#: (error or bias nodes); letters, digits and . _ : + - only, never a path separator.
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.:+\-]{1,64}$")
MAX_LABEL = 80
MAX_NOTE = 4000
MAX_NAME = 60
MAX_SUPERNODES = 100


def valid_node_id(node: object) -> bool:
    return isinstance(node, str) and bool(NODE_ID_RE.match(node))


def empty(feature: str) -> dict:
    return {"schema_version": schema.ANNOTATIONS_SCHEMA_VERSION, "feature": str(feature), "pinned": [],
            "supernodes": [], "labels": {}, "notes": {}}


def clean(obj: object, feature: str) -> tuple[dict, list[str]]:
    """The valid part of an annotations record, and what was dropped (named): a bad entry
    never costs the good ones next to it."""
    out = empty(feature)
    problems: list[str] = []
    if not isinstance(obj, dict):
        return out, ["the file is not a JSON object"]
    v = obj.get("schema_version")
    if v != schema.ANNOTATIONS_SCHEMA_VERSION:
        problems.append(f"schema_version {v!r} (this tool writes {schema.ANNOTATIONS_SCHEMA_VERSION}); read as far as possible")
    for n in obj.get("pinned") or []:
        if valid_node_id(n):
            if n not in out["pinned"]:
                out["pinned"].append(n)
        else:
            problems.append(f"pinned node {n!r} is not a node id")
    for sn in obj.get("supernodes") or []:
        name = sn.get("name") if isinstance(sn, dict) else None
        members = sn.get("members") if isinstance(sn, dict) else None
        if not isinstance(name, str) or not name.strip() or not isinstance(members, list):
            problems.append(f"supernode {sn!r} lacks a name or a members list")
            continue
        good = [m for m in dict.fromkeys(members) if valid_node_id(m)]
        if len(good) != len(members):
            problems.append(f"supernode {name!r}: dropped members that are not node ids")
        if good and len(out["supernodes"]) < MAX_SUPERNODES:
            out["supernodes"].append({"name": name.strip()[:MAX_NAME], "members": good})
    for key, limit in (("labels", MAX_LABEL), ("notes", MAX_NOTE)):
        d = obj.get(key) or {}
        if not isinstance(d, dict):
            problems.append(f"`{key}` is not an object")
            continue
        for n, text in d.items():
            if valid_node_id(n) and isinstance(text, str):
                if text.strip():
                    out[key][n] = text.strip()[:limit]
            else:
                problems.append(f"{key[:-1]} of {n!r} dropped (bad node id or not text)")
    if obj.get("updated"):
        out["updated"] = obj["updated"]
    return out, problems


def load(cache: Path, feature: str) -> tuple[dict, list[str]]:
    """The feature's annotations (empty when it has none), and problems found in the file."""
    path = schema.annotations_path(cache, feature)  # validates the feature id
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return empty(feature), []
    except OSError as exc:
        return empty(feature), [f"{path.name} cannot be read ({exc.strerror})"]
    try:
        import json

        obj = json.loads(raw)
    except ValueError:
        return empty(feature), [f"{path.name} is not valid JSON; saving a change replaces it"]
    ann, problems = clean(obj, feature)
    return ann, [f"{path.name}: {p}" for p in problems]


def save(cache: Path, feature: str, ann: dict) -> Path:
    path = schema.annotations_path(cache, feature)
    ann, _ = clean(ann, feature)
    ann["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return schema.atomic_write_json(path, ann)


def update(cache: Path, feature: str, change: Callable[[dict], dict]) -> dict:
    """Read, change and write the file under a lock (two tabs editing the same feature)."""
    path = schema.annotations_path(cache, feature)
    with schema.file_lock(path.with_name(f".{path.name}.lock")):
        ann, _ = load(cache, feature)
        new = change(copy.deepcopy(ann))
        save(cache, feature, new)
    return load(cache, feature)[0]


# ---------------------------------------------------------------------------
# Edits (pure: a new record from an old one)
# ---------------------------------------------------------------------------


def _check(node: str) -> str:
    if not valid_node_id(node):
        raise UserError(f"{node!r} is not a node id")
    return node


def set_pinned(ann: dict, nodes: list[str]) -> dict:
    ann["pinned"] = list(dict.fromkeys(_check(n) for n in nodes))
    return ann


def toggle_pin(ann: dict, node: str) -> dict:
    _check(node)
    pins = list(ann.get("pinned") or [])
    ann["pinned"] = [p for p in pins if p != node] if node in pins else pins + [node]
    return ann


def set_text(ann: dict, kind: str, node: str, text: str) -> dict:
    """kind: "labels" or "notes"; empty text removes the entry."""
    if kind not in ("labels", "notes"):
        raise ValueError(kind)
    _check(node)
    d = dict(ann.get(kind) or {})
    text = (text or "").strip()
    if text:
        d[node] = text[: MAX_LABEL if kind == "labels" else MAX_NOTE]
    else:
        d.pop(node, None)
    ann[kind] = d
    return ann


def add_supernode(ann: dict, name: str, members: list[str]) -> dict:
    """A new group (a member leaves any group it was in); a name in use is replaced."""
    name = (name or "").strip()[:MAX_NAME]
    members = list(dict.fromkeys(_check(m) for m in members))
    if not name:
        raise UserError("a supernode needs a name")
    if len(members) < 2:
        raise UserError("a supernode needs at least two nodes")
    rest = []
    for sn in ann.get("supernodes") or []:
        if sn["name"] == name:
            continue
        left = [m for m in sn["members"] if m not in members]
        if len(left) >= 2:
            rest.append({"name": sn["name"], "members": left})
    ann["supernodes"] = rest + [{"name": name, "members": members}]
    return ann


def remove_supernode(ann: dict, name: str) -> dict:
    ann["supernodes"] = [sn for sn in ann.get("supernodes") or [] if sn["name"] != name]
    return ann


def group_of(ann: dict) -> dict[str, str]:
    return {m: sn["name"] for sn in ann.get("supernodes") or [] for m in sn["members"]}


# ---------------------------------------------------------------------------
# Suggested supernodes: co-attribution from the graph's edges
# ---------------------------------------------------------------------------


def edge_profiles(nodes: list[str], edges: pd.DataFrame) -> np.ndarray:
    """Row i: node i's signed weights to every node (as source), then from every node (as
    target); zero where no edge."""
    idx = {n: i for i, n in enumerate(nodes)}
    k = len(nodes)
    out = np.zeros((k, 2 * k))
    for s, t, w in zip(edges["source"], edges["target"], edges["weight"].astype(float)):
        if s in idx and t in idx and np.isfinite(w):
            out[idx[s], idx[t]] += w
            out[idx[t], k + idx[s]] += w
    return out


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    c = (x / safe[:, None]) @ (x / safe[:, None]).T
    c[norm == 0, :] = 0.0
    c[:, norm == 0] = 0.0
    return c


def suggest_supernodes(nodes: pd.DataFrame, edges: pd.DataFrame, threshold: float = 0.9,
                       exclude: set[str] | None = None) -> list[dict]:
    """Groups of >= 2 upstream nodes of one layer whose edge profiles have average pairwise
    cosine >= threshold (average-linkage merging, most similar pair first). `exclude`
    (for instance nodes already in a supernode) stay out."""
    exclude = exclude or set()
    ids = [str(n) for n, t in zip(nodes["id"], nodes["is_target"].astype(bool))]
    prof = cosine_matrix(edge_profiles(ids, edges))
    pos = {n: i for i, n in enumerate(ids)}
    layer = dict(zip(nodes["id"].astype(str), nodes["layer"].astype(int)))
    target = set(nodes.loc[nodes["is_target"].astype(bool), "id"].astype(str))
    out = []
    for L in sorted({layer[n] for n in ids}):
        members = [n for n in ids if layer[n] == L and n not in target and n not in exclude]
        for c in _average_linkage(prof[np.ix_([pos[n] for n in members], [pos[n] for n in members])], threshold):
            if len(c) >= 2:
                out.append({"name": f"L{L} co-attribution {len(out) + 1}", "members": [members[i] for i in sorted(c)]})
    return out


def _average_linkage(sim: np.ndarray, threshold: float) -> list[list[int]]:
    """Merge the pair of clusters with the highest mean pairwise similarity while it is >=
    threshold (ties: the first pair in row order). Cluster sums are updated in place, so a
    merge costs O(m)."""
    m = len(sim)
    groups = [[i] for i in range(m)]
    if m < 2:
        return groups
    total = sim.astype(float).copy()
    size = np.ones(m)
    active = np.ones(m, dtype=bool)
    while active.sum() > 1:
        avg = total / np.outer(size, size)
        avg[~active, :] = -np.inf
        avg[:, ~active] = -np.inf
        np.fill_diagonal(avg, -np.inf)
        a, b = divmod(int(np.argmax(avg)), m)
        if avg[a, b] < threshold - 1e-12:
            break
        a, b = min(a, b), max(a, b)
        total[a, :] += total[b, :]
        total[:, a] += total[:, b]
        size[a] += size[b]
        active[b] = False
        groups[a] += groups[b]
    return [groups[i] for i in range(m) if active[i]]


# ---------------------------------------------------------------------------
# circuit-tracer export
# ---------------------------------------------------------------------------


def circuit_tracer_annotations(ann: dict | None) -> dict | None:
    """The `annotations` argument of engine.pathways.graph.circuit_tracer_json: pinned,
    supernodes [{name, members}], labels, in our node ids; None when there is nothing."""
    if not ann:
        return None
    out = {"pinned": list(ann.get("pinned") or []),
           "supernodes": [{"name": sn["name"], "members": list(sn["members"])} for sn in ann.get("supernodes") or []],
           "labels": dict(ann.get("labels") or {})}
    return out if any(out.values()) else None
