"""splitnode: phase-split LLM serving on one machine."""

from splitnode.config import EngineConfig
from splitnode.llm import LLM
from splitnode.outputs import RequestOutput
from splitnode.runtime import Runtime, RuntimeConfig
from splitnode.sampling import Logprob, SamplingParams

__all__ = ["LLM", "EngineConfig", "Logprob", "RequestOutput", "Runtime", "RuntimeConfig", "SamplingParams"]
__version__ = "0.1.0"
