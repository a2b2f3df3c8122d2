"""Two tiers: steps committed on a fast local disk are copied to a remote run directory in the
background and committed there with the remote store's own commit (a marker last).

The training loop never waits for the upload: :meth:`Replicator.submit` queues a step that is
already committed locally; one background thread uploads queued steps oldest first (streaming
the local file in bounded pieces), commits each, then applies the remote retention policy. A
crash loses nothing committed locally: the next replicator :meth:`~Replicator.resume` s every
local step that is not yet committed remotely (an unmarked remote prefix is removed and the
step uploaded again). Local retention must keep steps still queued (``pending``).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable

from .backend import BytesPayload, LocalFilePayload
from .fsspec_backend import FsspecBackend
from .run_dir import META_FILE, STATE_FILE, join, list_steps, step_dirname


def replicate_step(local_dir: str, remote_dir: str, remote: FsspecBackend, step: int) -> bool:
    """Copy committed local ``step`` to ``remote_dir`` and commit it there; False if absent
    locally. A step already committed remotely is left alone (steps are immutable)."""
    source = os.path.join(local_dir, step_dirname(step))
    if not os.path.isdir(source):
        return False
    if any(s.step == step for s in list_steps(remote_dir, remote)):
        return True
    target = join(remote_dir, step_dirname(step))
    remote.remove(target)  # an unmarked prefix left by a crashed upload: start it over
    staged = remote.stage(target)
    try:
        remote.write_payload(join(staged, STATE_FILE), LocalFilePayload(join(source, STATE_FILE)))
        with open(os.path.join(source, META_FILE), "rb") as handle:
            meta = handle.read()
        remote.write_payload(join(staged, META_FILE), BytesPayload(meta))
        remote.commit(staged, target)
    except BaseException:
        remote.abandon(staged)
        raise
    return True


class Replicator:
    """One background thread that replicates queued local steps to a remote run directory."""

    def __init__(
        self,
        local_dir: str,
        remote_dir: str,
        remote: FsspecBackend,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.local_dir, self.remote_dir, self.remote = local_dir, remote_dir, remote
        self.after = after  # remote retention, run after each replicated step
        self._queue: collections.deque[int] = collections.deque()
        self._busy: int | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._stopping = False

    def pending(self) -> set[int]:
        """Steps queued or uploading (local retention keeps them)."""
        with self._cond:
            out = set(self._queue)
            if self._busy is not None:
                out.add(self._busy)
            return out

    def resume(self) -> list[int]:
        """Queue every local step not committed remotely; returns them (oldest first)."""
        local = [s.step for s in list_steps(self.local_dir)]
        remote = {s.step for s in list_steps(self.remote_dir, self.remote)}
        missing = [s for s in local if s not in remote]
        for step in missing:
            self.submit(step)
        return missing

    def submit(self, step: int) -> None:
        """Queue a locally committed step for upload (returns at once)."""
        with self._cond:
            if step not in self._queue and step != self._busy:
                self._queue.append(step)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="torchkeep-replicate", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._busy = None
                    self._cond.notify_all()
                    return
                self._busy = self._queue.popleft()
                step = self._busy
            try:
                replicate_step(self.local_dir, self.remote_dir, self.remote, step)
                if self.after is not None:
                    self.after()
            except BaseException as exc:  # kept for wait(); the step is retried on resume
                with self._cond:
                    self.error = exc
                    self._queue.clear()
                    self._busy = None
                    self._cond.notify_all()
                return

    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued step is committed remotely; raise the upload's error."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and self._busy is None, timeout)
            error, self.error = self.error, None
        if error is not None:
            raise error
