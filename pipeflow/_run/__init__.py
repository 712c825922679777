"""The runner: how a pipeline's items travel and get processed during one run.

Layers, each in its own module, each importing only those above it:

- ``envelope``: what travels with an item (:class:`Env`), the :class:`Ack` protocol;
- ``edge``: the one place an item crosses between tasks (:class:`Edge`);
- ``forensics``: what each worker is doing now, and the stall watcher;
- ``calls``: the call for each kind of stage and its policy layers;
- ``shapers``: batching, key routing, reordering, autoscaling;
- ``failures``: one class per error policy, dead letters, error budgets;
- ``worker``: one stage during a run and its worker loop;
- ``run``: the nursery, the source pump, signals, the accounting after a stop.
"""

from .envelope import Ack as Ack
from .envelope import CountedAck as CountedAck
from .envelope import Env as Env
from .failures import TooManyFailures as TooManyFailures
from .run import Outlet as Outlet
from .run import Run as Run
from .run import Service as Service
from .run import SignalGate as SignalGate
from .run import running as running
from .shapers import stable_hash as stable_hash
