from __future__ import annotations

from tests.agent.conftest import agent_config, models, sim  # noqa: F401  (the agent tests' simulator fixtures)
