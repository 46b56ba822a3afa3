"""`gemport build --executor ray`: one Ray task per artifact (build and validation).

The driver (this process) reads the recipe, fingerprints the source, computes the reference cache in
the output folder, then submits each artifact as a task; a task built from another artifact gets that
task's result as an argument, so Ray runs it after. Each task runs the same code as the local
executor (``Build.process``: gemport child processes on the worker's node) and returns the artifact's
manifest record; only the driver writes the manifest. The output folder must be shared by every node
(a network file system), as the reference cache and the artifacts are read there.

Ray joins the cluster of ``RAY_ADDRESS`` or a running local one, else starts a local instance.
"""

from __future__ import annotations

import logging
from typing import Any

from gemport.artifacts.builder import Build, _exclusive
from gemport.errors import UnsupportedError

log = logging.getLogger(__name__)


def _process(build: Build, name: str, dep: dict | None) -> dict[str, Any]:
    return build.process(build.recipe.artifact(name), dep, None)


def run_on_ray(build: Build) -> dict[str, Any]:
    """Build ``build``'s artifacts as Ray tasks; returns the manifest."""
    try:
        import ray
    except ImportError:
        raise UnsupportedError("--executor ray needs Ray: pip install 'gemport[ray]'") from None
    build.out.mkdir(parents=True, exist_ok=True)
    with _exclusive(build.out):
        build.start()
        build._save()
        todo = build.todo()
        if any(build.wanted(a) for a in todo):
            build._reference_cache()  # before any task: every validation reads it
        started = not ray.is_initialized()
        if started:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            remote = ray.remote(num_cpus=1)(_process)
            shared = ray.put(build)  # the recipe, the manifest header and the previous records, once
            refs: dict[str, Any] = {}
            for art in todo:  # recipe order: an artifact's source is submitted before it
                refs[art.name] = remote.remote(shared, art.name, refs.get(art.source) if art.source else None)
            pending = {ref: name for name, ref in refs.items()}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                name = pending.pop(ready[0])
                record = ray.get(ready[0])
                build._set(name, record)
                build.done(name, record)
        finally:
            if started:
                ray.shutdown()
        build._save()
    return build.manifest
