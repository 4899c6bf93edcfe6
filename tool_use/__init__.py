"""Tools and message-level episodes for LLM agents. Start with ``tool_use.types``.

from tool_use import tool

@tool
async def add(a: int, b: int) -> int:
    \"\"\"Add two integers.\"\"\"
    return a + b
"""

from tool_use.agent_env import AgentToolMessageEnv, ParseErrorPolicy, zero_reward
from tool_use.errors import (
    EnvironmentFailure,
    RewardError,
    ToolCallError,
    ToolDefinitionError,
    ToolUseError,
)
from tool_use.execution import execute_tool_call
from tool_use.tool import FunctionTool, tool
from tool_use.types import (
    Message,
    MessageEnv,
    MessageStepResult,
    ParsedResponse,
    RewardFn,
    StopReason,
    Tool,
    ToolCall,
    ToolErrorKind,
    ToolResult,
    ToolSpec,
)

__all__ = [
    "AgentToolMessageEnv",
    "EnvironmentFailure",
    "FunctionTool",
    "Message",
    "MessageEnv",
    "MessageStepResult",
    "ParseErrorPolicy",
    "ParsedResponse",
    "RewardError",
    "RewardFn",
    "StopReason",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolDefinitionError",
    "ToolErrorKind",
    "ToolResult",
    "ToolSpec",
    "ToolUseError",
    "execute_tool_call",
    "tool",
    "zero_reward",
]
