"""``edgetl device serve``: the operator's console, a small web page and JSON API over :class:`edgetl.DeviceRuntime`.

- :mod:`edgetl.serve.queue` — the label queue's ranking (numpy only);
- :mod:`edgetl.serve.app` — the Starlette application (needs the ``serve`` extra: starlette, uvicorn,
  prometheus-client), imported only when the console is started.
"""

from __future__ import annotations
