"""Runs memloc in a subprocess that kills itself (SIGKILL) at a chosen point: the fault suite's real kills.

    python fault_driver.py KILL_AT -- ARGS...     ARGS as for `memloc`; KILL_AT is
      none                   no kill
      created:NAME           right after the run directory NAME (its run.json) is created
      running:KEY / done:KEY right after the study marks stage KEY running / done
      stage:KEY              right after any run (not a study) marks stage KEY done (an audit's localize)
      fail:KEY               stage KEY of the study raises a RunError (no kill: a failed stage)
      partial:PROBE          right after the probe PROBE first saved its partial progress (mid-stage)
      chunk:N                right after an audit's streaming scan saved its N-th chunk of a token file
      epoch:N                right after training saved epoch N
      pause:N:FILE           after training saved epoch N, wait (holding the lock) until FILE exists
      gap:KEY:FILE           after the study marks stage KEY done, wait (between two stages) until FILE exists

The monkeypatches wrap memloc's own functions, so the process dies exactly at a
boundary of the on-disk state, as a kill by the user or the machine would leave it.
"""

import os
import signal
import sys
import time


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill_at: str) -> None:
    from memloc.core import runs, training
    from memloc.study import run as study
    kind, _, arg = kill_at.partition(":")
    if kind == "created":
        create = runs.RunDir.create.__func__

        def created(cls, path, **kw):
            run = create(cls, path, **kw)
            if run.path.name == arg:
                _die()
            return run
        runs.RunDir.create = classmethod(created)
    elif kind in ("running", "done"):
        set_stage = runs.RunDir.set_stage

        def marked(self, key, status, **kw):
            set_stage(self, key, status, **kw)
            if self.kind == "study" and key == arg and status == kind:
                _die()
        runs.RunDir.set_stage = marked
    elif kind == "stage":
        set_stage = runs.RunDir.set_stage

        def marked_run(self, key, status, **kw):
            set_stage(self, key, status, **kw)
            if self.kind != "study" and key == arg and status == "done":
                _die()
        runs.RunDir.set_stage = marked_run
    elif kind == "gap":
        set_stage = runs.RunDir.set_stage
        key, _, flag = arg.partition(":")

        def between(self, k, status, **kw):
            set_stage(self, k, status, **kw)
            if self.kind == "study" and k == key and status == "done":
                print("paused", flush=True)
                while not os.path.exists(flag):
                    time.sleep(0.05)
        runs.RunDir.set_stage = between
    elif kind == "fail":
        stage = study._Cell.stage

        def failing(self, name, *a, **k):
            if name == arg:
                from memloc.core.errors import RunError
                raise RunError(f"stage {arg} broke")
            return stage(self, name, *a, **k)
        study._Cell.stage = failing
    elif kind == "partial":
        from memloc.probes import Partial
        save = Partial.save

        def saved_partial(self, *a, **k):
            save(self, *a, **k)
            if self.probe == arg:
                _die()
        Partial.save = saved_partial
    elif kind == "chunk":
        from memloc.audit import scan as audit_scan
        save_part = audit_scan._save_part
        saved_parts = []

        def saved_chunk(*a, **k):
            save_part(*a, **k)
            saved_parts.append(1)
            if len(saved_parts) == int(arg):
                _die()
        audit_scan._save_part = saved_chunk
    elif kind in ("epoch", "pause"):
        save = training.Trainer._save_epoch
        n, _, flag = arg.partition(":")

        def saved(self, epoch):
            save(self, epoch)
            if epoch == int(n):
                if kind == "epoch":
                    _die()
                print("paused", flush=True)
                while not os.path.exists(flag):
                    time.sleep(0.05)
        training.Trainer._save_epoch = saved
    elif kind != "none":
        raise SystemExit(f"unknown kill point {kill_at!r}")


if __name__ == "__main__":
    kill_at, sep, *argv = sys.argv[1:]
    assert sep == "--"
    install(kill_at)
    from memloc.cli import main
    sys.exit(main(argv))
