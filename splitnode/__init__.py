"""splitnode: phase-split LLM serving on one machine."""

from splitnode.engine.config import EngineConfig
from splitnode.engine.llm import LLM
from splitnode.engine.outputs import RequestOutput
from splitnode.engine.sampling import Logprob, SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig

__all__ = ["LLM", "EngineConfig", "Logprob", "RequestOutput", "Runtime", "RuntimeConfig", "SamplingParams"]
__version__ = "0.1.0"
