"""switches(env): the kernels' environment switches (TACA_FWD_*, TACA_BWD_*: read at every call) set for a block of
calls, then restored to what they were (unset ones unset again), for the sanitizer harnesses."""
import contextlib
import os


@contextlib.contextmanager
def switches(env):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
