"""Validate an export folder against circuit-tracer's own pydantic graph models (run with the
circuit-tracer venv's python): `python validate_ct.py DATA_DIR`. Prints one JSON line:
{"graphs": n, "nodes": n, "links": n, "cantor": [[layer, index, feature], ...]} or exits non-zero
with pydantic's message. `cantor` recomputes every feature node's `feature` with circuit-tracer's
own pairing function, for the caller to compare."""

import json
import pathlib
import sys

from circuit_tracer.frontend.graph_models import Metadata, Model, _cantor_pairing

folder = pathlib.Path(sys.argv[1])
listing = json.loads((folder / "graph-metadata.json").read_text())
counts = {"graphs": 0, "nodes": 0, "links": 0, "mismatches": [], "slugs": []}
for entry in listing["graphs"]:
    meta = Metadata(**entry)
    model = Model(**json.loads((folder / f"{meta.slug}.json").read_text()))
    assert model.metadata.slug == meta.slug, (model.metadata.slug, meta.slug)
    counts["graphs"] += 1
    counts["slugs"].append(meta.slug)
    counts["nodes"] += len(model.nodes)
    counts["links"] += len(model.links)
    ids = {n.node_id for n in model.nodes}
    for link in model.links:
        assert link["source"] in ids and link["target"] in ids, link
    for node in model.nodes:
        if node.feature_type == "cross layer transcoder":
            layer, index = int(node.layer), int(node.node_id.split("_")[1])
            if node.feature != _cantor_pairing(layer, index):
                counts["mismatches"].append(node.node_id)
print(json.dumps(counts))
