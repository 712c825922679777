"""pipeflow: streaming, multi-stage, concurrent pipelines on Trio.

from pipeflow import Pipeline, stage

@stage(workers=16)
async def fetch(url): ...

result = Pipeline(fetch | parse | store).run(urls)
"""

# First: in the pipeflow command, a signal during the imports below is one line (see it).
from . import _cli_start as _cli_start
from ._chain import Chain as Chain
from ._errors import CircuitOpen as CircuitOpen
from ._errors import Failed as Failed
from ._errors import Interrupted as Interrupted
from ._errors import PipelineClosed as PipelineClosed
from ._errors import PipelineFull as PipelineFull
from ._errors import StageError as StageError
from ._pipeline import Flow as Flow
from ._pipeline import Outputs as Outputs
from ._pipeline import Pipeline as Pipeline
from ._pipeline import RunResult as RunResult
from ._policies import CircuitBreaker as CircuitBreaker
from ._policies import Retry as Retry
from ._run import TooManyFailures as TooManyFailures
from ._run.forensics import WorkerStatus as WorkerStatus
from ._stage import FunctionStage as FunctionStage
from ._stage import Stage as Stage
from ._stage import stage as stage
from ._stats import StageSample as StageSample
from ._stats import StageStats as StageStats

__version__ = "0.1.0.dev0"

__all__ = [
    "Pipeline",
    "stage",
    "Stage",
    "FunctionStage",
    "Chain",
    "RunResult",
    "StageSample",
    "StageStats",
    "WorkerStatus",
    "Flow",
    "Outputs",
    "StageError",
    "TooManyFailures",
    "Failed",
    "PipelineFull",
    "PipelineClosed",
    "Interrupted",
    "CircuitOpen",
    "CircuitBreaker",
    "Retry",
]
